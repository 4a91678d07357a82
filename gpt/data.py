"""Text -> token cache -> training windows -> batches.

`load_tokens(source)` turns text into GPT-2 token ids, once: the ids go to a uint16 file under
`data/cache/` with a JSON sidecar, and later calls map that file (`np.memmap`) instead of tokenizing
again. A source is a text file, a directory (every `*.txt` below it, in sorted order), a glob, a corpus
name from `CORPORA`, or a Hugging Face dataset `hf:NAME[[:CONFIG]:SPLIT]` streamed with `datasets`.
Each file (or corpus topic, or dataset record) is one document; `<|endoftext|>` separates documents.

Tokenizing streams the text in pieces of about a megabyte, cut only where the cut cannot change the
tokens (see `_safe_pieces`), and encodes them on every core (tiktoken releases the GIL), so memory stays
flat whatever the corpus size. The cache is keyed on the source's identity (path or name) and the
tokenizer, and checked against the sha256 of the source bytes: an edited file is tokenized again.

`split_tokens` / `prepare_data` give the (train, validation) arrays; `SlidingWindowDataset` cuts an
array into (input, target) windows the way the book does (`range(0, N - L, stride)`), but lazily: it
keeps the one array and slices on demand, so its memory is O(N) whatever the stride.
`create_dataloader` wraps it with a seeded, resumable sampler.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import mmap
import os
import re
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import torch
from tiktoken_ext.openai_public import r50k_pat_str
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from gpt.atomic import atomic_file, write_json
from gpt.errors import UserError, first_line
from gpt.tokenizer import ENCODER_JSON_SHA256, ENDOFTEXT_ID, VOCAB_BPE_SHA256, get_tokenizer


class DataError(UserError, ValueError):
    """Unusable data or data settings (a `ValueError`, so plain Python callers can catch it)."""


CORPORA: dict[str, str] = {
    "default": "Python's own help topics (pydoc_data, ~139k tokens): built in, works offline",
    "the-verdict": "Edith Wharton's short story used in the book (~5k tokens), downloaded once",
    "tinyshakespeare": "Karpathy's tiny Shakespeare (~338k tokens), downloaded once",
}
"""The corpus names `load_tokens` accepts, with a one-line description each (for --help)."""

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Download:
    """Where a downloadable corpus comes from and the sha256 its bytes must have."""

    url: str
    sha256: str


# Module-level so tests can point a corpus at a local server.
DOWNLOADS: dict[str, Download] = {
    "the-verdict": Download(
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
        "the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "tinyshakespeare": Download(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}
DOWNLOAD_TIMEOUT_S = 30.0

ERRORS_MODES = ("strict", "replace")
CACHE_FORMAT = 1  # bump when the cache layout or the document rules change: old caches are rebuilt
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits; little-endian on every machine
READ_BYTES = 1 << 20  # bytes read from a file at a time
PIECE_CHARS = 1 << 20  # characters per tokenizer call: big enough to amortise, small enough to stay flat
SCAN_TOKENS = 1 << 23  # tokens per read when checking a cache for out-of-range ids


# ---------------------------------------------------------------------------------------------
# Sources: what a `source` string names, as a sequence of documents of bytes.


@dataclass(frozen=True)
class _Source:
    label: str
    """Short name for progress bars and the cache file name."""
    identity: str
    """What names the source (absolute path, corpus or dataset name); part of the cache key."""
    documents: Callable[[], Iterator[tuple[str, Iterable[bytes]]]]
    """A fresh iterator of (name for messages, byte blocks) per document, each call."""
    total_bytes: int | None
    """For the progress bar; None for a stream of unknown length."""
    hashable: bool
    """Whether the content can be hashed before tokenizing (a remote stream cannot, cheaply)."""


def _resolve(source: str, data_dir: Path) -> _Source:
    if source.startswith(HF_PREFIX):
        return _hf_source(source)
    if source == "default":
        return _default_source()
    if source in DOWNLOADS:
        path = _fetch_corpus(source, data_dir)
        return _files_source(source, f"corpus:{source}", [path])
    path = Path(source).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty; give a file with text in it")
        return _files_source(path.name, f"file:{path.resolve()}", [path])
    if path.is_dir():
        return _directory_source(path)
    if any(char in source for char in "*?["):
        return _glob_source(source)
    raise DataError(
        f"{source!r} is not an existing file, directory, glob or corpus name; check the path, or use "
        f"one of the corpora {', '.join(CORPORA)} or {HF_PREFIX}NAME (a Hugging Face dataset)"
    )


def _directory_source(root: Path) -> _Source:
    # Sorted by path components, so the order is the same on every machine and file system.
    paths = sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).parts)
    if not paths:
        raise DataError(f"directory {root} holds no .txt files; put text files in it or give a file instead")
    _require_some_text(paths, f"directory {root}")
    return _files_source(root.resolve().name, f"dir:{root.resolve()}", paths)


def _glob_source(pattern: str) -> _Source:
    expanded = os.path.expanduser(pattern)
    paths = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"no files match {pattern!r}; check the pattern (quote it so the shell keeps it)")
    _require_some_text(paths, f"glob {pattern!r}")
    return _files_source("glob", f"glob:{os.path.abspath(expanded)}", paths)


def _require_some_text(paths: list[Path], what: str) -> None:
    if all(p.stat().st_size == 0 for p in paths):
        raise DataError(f"all {len(paths)} files of {what} are empty; give files with text in them")


def _files_source(label: str, identity: str, paths: list[Path]) -> _Source:
    def documents() -> Iterator[tuple[str, Iterable[bytes]]]:
        for path in paths:
            yield str(path), _read_blocks(path)

    return _Source(label, identity, documents, sum(p.stat().st_size for p in paths), hashable=True)


def _read_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while block := file.read(READ_BYTES):
            yield block


def _default_source() -> _Source:
    try:
        from pydoc_data.topics import topics  # the text behind help("if"), help("FORMATTING"), ...
    except ImportError:
        raise DataError(
            "the 'default' corpus reads Python's pydoc_data module, which this Python lacks; use "
            "--data tinyshakespeare or a text file instead"
        ) from None
    texts = [(f"pydoc_data topic {key!r}", topics[key].encode("utf-8")) for key in sorted(topics)]

    def documents() -> Iterator[tuple[str, Iterable[bytes]]]:
        for name, data in texts:
            yield name, (data,)

    return _Source("default", "corpus:default", documents, sum(len(d) for _, d in texts), hashable=True)


def _hf_source(source: str) -> _Source:
    parts = source[len(HF_PREFIX):].split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise DataError(
            f"cannot parse {source!r}; write {HF_PREFIX}NAME, {HF_PREFIX}NAME:SPLIT or "
            f"{HF_PREFIX}NAME:CONFIG:SPLIT, e.g. {HF_PREFIX}roneneldan/TinyStories:validation"
        )
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) >= 2 else "train"
    identity = f"hf:{name}:{config or ''}:{split}"

    def documents() -> Iterator[tuple[str, Iterable[bytes]]]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{source!r} needs the optional 'datasets' package; install it with: pip install -e '.[hf]'"
            ) from None
        try:
            records = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        except Exception as exc:  # datasets raises many types (network, unknown name, bad split)
            raise DataError(
                f"cannot open {source!r}: {first_line(exc)}; check the name, split and network"
            ) from None
        index = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # a stream can fail at any record (network, bad shard)
                raise DataError(
                    f"reading {source!r} failed at record {index}: {first_line(exc)}; check the network, "
                    "retry"
                ) from None
            if "text" not in record:
                raise DataError(
                    f"{source!r} has no 'text' field (fields: {', '.join(map(str, record))}); use a dataset "
                    "with a 'text' column"
                )
            # Lone surrogates cannot be UTF-8; "replace" keeps a malformed record from stopping the run.
            yield f"{source} record {index}", (str(record["text"]).encode("utf-8", "replace"),)
            index += 1

    return _Source(name.replace("/", "_"), identity, documents, total_bytes=None, hashable=False)


# ---------------------------------------------------------------------------------------------
# Downloads: small public corpora, fetched once and checked by sha256.


def _fetch_corpus(name: str, data_dir: Path) -> Path:
    """`data_dir/<name>.txt`, downloaded first if missing; its sha256 is checked either way."""
    spec = DOWNLOADS[name]
    path = data_dir / f"{name}.txt"
    if path.exists():
        actual = _sha256_file(path)
        if actual != spec.sha256:
            raise DataError(
                f"{path} has sha256 {actual}, expected {spec.sha256}; delete it so {name} is downloaded "
                f"again, or replace it with the file from {spec.url}"
            )
        return path
    # Written under a temporary name and renamed only once complete and checked: an interrupted or
    # corrupted download never leaves a file that looks like the corpus.
    with atomic_file(path) as tmp:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                while block := response.read(1 << 16):
                    digest.update(block)
                    tmp.write(block)
        except OSError as exc:  # URLError, HTTPError, timeouts and resets are all OSErrors
            reason = getattr(exc, "reason", None) or exc
            raise DataError(
                f"cannot download {name} from {spec.url} ({first_line(reason)}); check the network, or "
                f"download that file by hand and save it as {path}"
            ) from None
        if digest.hexdigest() != spec.sha256:
            raise DataError(
                f"the download of {name} from {spec.url} has sha256 {digest.hexdigest()}, expected "
                f"{spec.sha256}; retry, or save the right file by hand as {path}"
            )
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for block in _read_blocks(path):
        digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading: bytes -> hashed -> UTF-8 text -> pieces that tokenize independently.


class _Digest:
    """sha256 of all source bytes in order, plus a hash of the layout (each document's name and size).

    The two together pin the tokens: the same bytes split into different documents get different
    `<|endoftext|>` positions, and the layout hash sees that.
    """

    def __init__(self) -> None:
        self._content = hashlib.sha256()
        self._layout = hashlib.sha256()
        self.bytes = 0
        self.documents = 0

    def read(self, name: str, blocks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass one document's blocks through, hashing them; its layout entry is added at the end."""
        size = 0
        for block in blocks:
            self._content.update(block)
            size += len(block)
            yield block
        # surrogateescape: a file name that is not valid UTF-8 still hashes, deterministically.
        self._layout.update(f"{name}\0{size}\n".encode("utf-8", "surrogateescape"))
        self.bytes += size
        self.documents += 1

    def summary(self) -> dict[str, Any]:
        return {"sha256": self._content.hexdigest(), "layout_sha256": self._layout.hexdigest(),
                "bytes": self.bytes, "documents": self.documents}


def _content_summary(source: _Source) -> dict[str, Any]:
    """What `_Digest` says about the source as it is now, without tokenizing it."""
    digest = _Digest()
    for name, blocks in source.documents():
        for _ in digest.read(name, blocks):
            pass
    return digest.summary()


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: whatever precedes it is complete
            return len(data)
        if byte >= 0xC0:  # lead byte of a sequence of 2, 3 or 4 bytes
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= needed else len(data) - back
    return len(data)  # only continuation bytes: invalid however it is cut; the decoder reports it


class _Reader:
    """Streams a source as (text piece, starts a document), hashing and decoding the bytes on the way."""

    def __init__(self, errors: str, on_bytes: Callable[[int], object]) -> None:
        self.errors = errors
        self.digest = _Digest()
        self.replaced = False  # whether errors="replace" had to substitute anything
        self._on_bytes = on_bytes

    def pieces(self, source: _Source) -> Iterator[tuple[str, bool]]:
        for name, blocks in source.documents():
            texts = self._decode(name, self.digest.read(name, blocks))
            for i, piece in enumerate(_safe_pieces(texts, PIECE_CHARS)):
                yield piece, i == 0

    def _decode(self, name: str, blocks: Iterable[bytes]) -> Iterator[str]:
        carry, offset = b"", 0  # bytes of a character cut by the block end; offset of carry[0]
        for block in blocks:
            self._on_bytes(len(block))
            data = carry + block
            cut = _complete_utf8_prefix(data)
            yield self._decode_utf8(data[:cut], name, offset)
            carry, offset = data[cut:], offset + cut
        if carry:  # the document ends inside a character
            yield self._decode_utf8(carry, name, offset)

    def _decode_utf8(self, data: bytes, name: str, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.errors != "replace":
                raise DataError(
                    f"{name} is not valid UTF-8 at byte {offset + exc.start} (0x{data[exc.start]:02x}); "
                    "convert it to UTF-8, or pass --errors replace to substitute U+FFFD for bad bytes"
                ) from None
            self.replaced = True
            return data.decode("utf-8", "replace")


# A cut between a non-space character and a following space or newline. GPT-2's pre-tokenizer regex
# (tiktoken's r50k pattern) never puts a non-space and a following space in one pre-token, and none of
# its alternatives looks behind, so a pre-token ends there and matching restarts identically after it.
# Before the cut, the last pre-token is non-space, and end-of-text changes nothing for those: only
# `\s++$` and `\s+(?!\S)` look at what follows, and both start with whitespace. BPE merges never cross
# pre-tokens, so encoding the two sides separately gives exactly the tokens of the whole.
# Python's `\s` (str.isspace) is a superset of the regex crate's Unicode `\s`, so `[^\s]` is safe.
_SAFE_CUT = re.compile(r"[^\s][ \n]")


def _safe_pieces(texts: Iterable[str], target: int) -> Iterator[str]:
    """Re-cut a stream of text into non-empty pieces of about `target` characters or more, only at
    `_SAFE_CUT` points, so that tokenizing the pieces one by one equals tokenizing their concatenation.
    A text with no safe cut (no spaces at all) stays in one piece."""
    buffer = ""
    scan_from = 0  # where to look for the next cut; text before it is known to hold none past target
    for text in texts:
        buffer += text
        while len(buffer) > target:
            match = _SAFE_CUT.search(buffer, max(scan_from, target - 1))
            if match is None:
                scan_from = len(buffer) - 1  # the last character may pair with the next text's first
                break
            cut = match.start() + 1
            yield buffer[:cut]
            buffer, scan_from = buffer[cut:], 0
    if buffer:
        yield buffer


# ---------------------------------------------------------------------------------------------
# Tokenizing into the cache.


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    return os.cpu_count() or 1


def _batches(pieces: Iterable[tuple[str, bool]], min_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces into batches of at least `min_chars`, so many tiny documents make few thread tasks."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= min_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_tokens(pieces: Iterable[tuple[str, bool]], out: BinaryIO) -> int:
    """Tokenize the pieces on every core, in order, into `out` as uint16; `<|endoftext|>` goes before
    each document but the first. Returns the number of tokens written."""
    encoding = get_tokenizer()
    eot = np.array([ENDOFTEXT_ID], dtype=TOKEN_DTYPE)
    written = 0

    def encode(batch: list[tuple[str, bool]]) -> list[tuple[np.ndarray, bool]]:
        # encode_to_numpy releases the GIL and skips the Python list of ints; with nothing allowed
        # and nothing disallowed it is encode_ordinary: "<|endoftext|>" in the text is plain text.
        return [(encoding.encode_to_numpy(text, disallowed_special=()).astype(TOKEN_DTYPE), starts)
                for text, starts in batch]

    def write(future: Future[list[tuple[np.ndarray, bool]]]) -> None:
        nonlocal written
        for ids, starts_document in future.result():
            if starts_document and written:
                out.write(eot.tobytes())
                written += 1
            out.write(ids.tobytes())
            written += len(ids)

    threads = _cpu_count()
    pool = ThreadPoolExecutor(threads)
    try:
        pending: deque[Future[list[tuple[np.ndarray, bool]]]] = deque()
        for batch in _batches(pieces, PIECE_CHARS):
            pending.append(pool.submit(encode, batch))
            if len(pending) > 2 * threads:  # bounded read-ahead keeps memory flat
                write(pending.popleft())
        while pending:
            write(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return written


def _tokenizer_id() -> str:
    """Names the tokenizer in the cache key: its BPE files, pre-tokenizer pattern and specials."""
    encoding = get_tokenizer()
    spec = [encoding.name, encoding.n_vocab, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256, r50k_pat_str,
            ENDOFTEXT_ID]
    return f"{encoding.name}-{hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]}"


def _cache_paths(source: _Source, cache_dir: Path, tokenizer: str) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{source.identity}\n{tokenizer}\n{CACHE_FORMAT}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.label)[:48] + f"-{key}"
    return cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half-written: treated as no cache
        return None
    return meta if isinstance(meta, dict) else None


def _cache_is_current(meta: dict[str, Any], source: _Source, tokenizer: str, errors: str) -> bool:
    if (meta.get("format"), meta.get("identity"), meta.get("tokenizer")) != (
            CACHE_FORMAT, source.identity, tokenizer):
        return False
    if meta.get("replaced") and errors == "strict":
        return False  # built with substitutions; rebuilding names the bad byte, as strict promises
    if not source.hashable:
        return True  # a remote stream: trust the name (delete the cache files to refresh it)
    current = _content_summary(source)
    return all(meta.get(key) == value for key, value in current.items())


def _cache_problem(path: Path, tokens: Any) -> str | None:
    """Why the token file cannot be what its sidecar says, or None if it looks whole."""
    vocab_size = get_tokenizer().n_vocab
    if not isinstance(tokens, int) or tokens < 1:
        return f"sidecar token count {tokens!r}"
    try:
        size = path.stat().st_size
    except OSError:
        return "token file missing"
    if size != tokens * TOKEN_DTYPE.itemsize:
        return f"{size} bytes for {tokens} tokens"
    # Read, not mapped, so the scan does not leave the whole file resident in this process.
    with path.open("rb") as file:
        while (ids := np.fromfile(file, dtype=TOKEN_DTYPE, count=SCAN_TOKENS)).size:
            if (biggest := int(ids.max())) >= vocab_size:
                return f"token id {biggest} >= vocabulary size {vocab_size}"
    return None


def _build_cache(source: _Source, source_arg: str, bin_path: Path, meta_path: Path, tokenizer: str,
                 errors: str) -> dict[str, Any]:
    """Tokenize `source` into `bin_path` and write its sidecar. A crash at any point leaves the old
    cache, no cache (rebuilt next time), or the new one whole; never a token file whose sidecar
    misdescribes it."""
    with tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {source.label}") as bar:
        reader = _Reader(errors, bar.update)
        with atomic_file(bin_path) as out:
            tokens = _write_tokens(reader.pieces(source), out)
            if tokens == 0:
                raise DataError(f"{source_arg!r} holds no text; give a source with text in it")
            meta_path.unlink(missing_ok=True)  # the old sidecar goes before the old token file does
    meta = {"format": CACHE_FORMAT, "source": source_arg, "identity": source.identity, "tokenizer": tokenizer,
            **reader.digest.summary(), "tokens": tokens, "dtype": TOKEN_DTYPE.str, "errors": errors,
            "replaced": reader.replaced, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(meta_path, meta)
    return meta


def load_tokens(source: str, *, data_dir: Path = Path("data"), errors: str = "strict") -> np.ndarray:
    """All tokens of a source (file, dir, glob, corpus name or hf:NAME) as a 1-D uint16 array (a memmap
    of the cache under `data_dir/cache/`, built on first use and rebuilt when the source changes).

    `errors="replace"` substitutes U+FFFD for bytes that are not UTF-8 instead of refusing the file.
    """
    if errors not in ERRORS_MODES:
        raise DataError(f"errors must be one of {', '.join(ERRORS_MODES)}, got {errors!r}")
    data_dir = Path(data_dir)
    try:
        return _load_tokens(source, data_dir, errors)
    except OSError as exc:  # an unreadable source, a read-only data_dir, a full disk
        raise DataError(
            f"reading {source!r} or writing its token cache under {data_dir / 'cache'} failed ({exc}); "
            "check the permissions and free disk space, or pass another data directory"
        ) from None


def _load_tokens(source: str, data_dir: Path, errors: str) -> np.memmap:
    resolved = _resolve(source, data_dir)
    tokenizer = _tokenizer_id()
    bin_path, meta_path = _cache_paths(resolved, data_dir / "cache", tokenizer)
    meta = _read_meta(meta_path)
    if meta is not None and _cache_is_current(meta, resolved, tokenizer, errors):
        problem = _cache_problem(bin_path, meta.get("tokens"))
        if problem is None:
            return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r", shape=(meta["tokens"],))
        print(f"warning: token cache {bin_path} is corrupt ({problem}); rebuilding it", file=sys.stderr)
    meta = _build_cache(resolved, source, bin_path, meta_path, tokenizer, errors)
    return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r", shape=(meta["tokens"],))


# ---------------------------------------------------------------------------------------------
# Splits.


def _slice(tokens: np.ndarray, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop]; a memmap made by `np.memmap` becomes a new memmap of just that range, so it
    still pickles as (file, offset, length) for DataLoader workers (see `SlidingWindowDataset`)."""
    origin = _memmap_origin(tokens)
    if origin is not None and stop > start:
        filename, offset, _ = origin
        return np.memmap(filename, dtype=tokens.dtype, mode="r", offset=offset + start * tokens.itemsize,
                         shape=(stop - start,))
    return tokens[start:stop]


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last val_fraction of the tokens is validation (rounded to whole tokens)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; e.g. 0.1")
    n = len(tokens)
    n_train = n - round(n * val_fraction)
    return _slice(tokens, 0, n_train), _slice(tokens, n_train, n)


def prepare_data(data: str = "default", val_data: str | None = None, *, val_fraction: float = 0.1,
                 context_length: int = 256, data_dir: Path = Path("data"), errors: str = "strict",
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids) ready for create_dataloader, after checking each holds at least one window
    (context_length + 1 tokens); raises UserError otherwise, naming the counts.

    Without `val_data` the validation part is the last `val_fraction` of `data`; with it, all of
    `data` trains and all of `val_data` validates.
    """
    if not isinstance(context_length, int) or context_length < 1:
        raise DataError(f"context_length must be a positive integer, got {context_length!r}")
    need = context_length + 1
    tokens = load_tokens(data, data_dir=data_dir, errors=errors)
    fix = "use more text or a smaller context length"
    if len(tokens) < need:
        raise DataError(f"{data!r} has {len(tokens)} tokens, but one window needs context_length + 1 = "
                        f"{need}; {fix}")
    if val_data is not None:
        val = load_tokens(val_data, data_dir=data_dir, errors=errors)
        if len(val) < need:
            raise DataError(f"validation source {val_data!r} has {len(val)} tokens, but one window needs "
                            f"context_length + 1 = {need}; {fix}")
        return tokens, val
    train, val = split_tokens(tokens, val_fraction)
    n = len(tokens)
    if min(len(train), len(val)) >= need:
        return train, val
    if n < 2 * need:
        raise DataError(
            f"{data!r} has {n} tokens, too few for one training and one validation window of context_length "
            f"+ 1 = {need} tokens each; {fix}, or give a separate validation source"
        )
    part, size = ("validation", len(val)) if len(val) < need else ("training", len(train))
    # The fractions whose rounded split leaves both parts a window (three decimals, rounded inwards).
    low, high = math.ceil(need / n * 1000) / 1000, math.floor((1 - need / n) * 1000) / 1000
    raise DataError(
        f"the {part} split of {data!r} (val_fraction {val_fraction:g} of {n} tokens) has {size} tokens, but "
        f"one window needs context_length + 1 = {need}; use a validation fraction between {low:g} and "
        f"{high:g}, or give a separate validation source"
    )


# ---------------------------------------------------------------------------------------------
# Windows and batches.


def _memmap_origin(array: Any) -> tuple[str, int, int] | None:
    """(file, byte offset, length) of a memmap made directly by `np.memmap`, else None.

    Only such a memmap has `offset` and `shape` that describe its own data (a slice of one keeps its
    parent's offset); its `base` is then the `mmap.mmap` itself.
    """
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return array.filename, array.offset, len(array)
    return None


class SlidingWindowDataset(Dataset[tuple[Tensor, Tensor]]):
    """Window i starts at s = i * stride: x = ids[s : s + L], y = ids[s + 1 : s + L + 1] (int64).

    There is a window for every start s with s + L + 1 <= N. `token_ids` may be a NumPy array (a
    memmap of a token cache included), a 1-D tensor or a list; it is kept as is, never copied per
    window, so a memmap stays on disk until a window is read. Pickling (as DataLoader workers started
    with spawn or forkserver do) sends a memmap as its file name and range, not its contents.
    """

    def __init__(self, token_ids: np.ndarray | Tensor | list[int], context_length: int,
                 stride: int) -> None:
        if context_length < 1:
            raise DataError(f"context_length must be >= 1, got {context_length}; pass a positive one")
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}; stride = context length: no overlap")
        if isinstance(token_ids, list):
            token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.ndim != 1:
            raise DataError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}; flatten it")
        self.token_ids = token_ids
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        n_starts = len(self.token_ids) - self.context_length  # starts s = 0 .. N - L - 1
        return max(0, (n_starts + self.stride - 1) // self.stride)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        chunk = self.token_ids[start:start + self.context_length + 1]  # L + 1 tokens
        chunk = torch.as_tensor(np.asarray(chunk, dtype=np.int64)) if not isinstance(
            chunk, Tensor) else chunk.long()
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        origin = _memmap_origin(self.token_ids)
        if origin is not None:
            state["token_ids"] = ("memmap", *origin, cast(np.memmap, self.token_ids).dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["token_ids"], tuple):
            _, filename, offset, length, dtype = state["token_ids"]
            state["token_ids"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset,
                                           shape=(length,))
        self.__dict__.update(state)


class ResumableSampler(Sampler[int]):
    """Shuffles (or not) with a generator seeded by (seed, epoch); remembers how far it got.

    The order of epoch e depends only on `seed` and e, so a checkpoint needs just (epoch, position)
    to resume mid-epoch at exactly the next batch: `state_dict()` / `load_state_dict()`. The shuffled
    order is one int32 tensor (4 bytes a window), never a Python list (~40 bytes a window): with
    stride 1 there are as many windows as tokens.
    """

    def __init__(self, data_source: Sized, shuffle: bool, seed: int) -> None:
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out

    def _order(self) -> Tensor | range:
        if not self.shuffle:
            return range(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        dtype = torch.int32 if self.num_samples < 2**31 else torch.int64
        return torch.randperm(self.num_samples, generator=generator, dtype=dtype)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.num_samples:
            index = int(order[self.position])
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def create_dataloader(token_ids: np.ndarray | Tensor | list[int], batch_size: int = 8,
                      context_length: int = 256, stride: int = 256, shuffle: bool = True,
                      drop_last: bool = True, seed: int = 0,
                      num_workers: int = 0) -> DataLoader[tuple[Tensor, Tensor]]:
    """A DataLoader of (x, y) batches, each (batch_size, context_length) int64.

    Its sampler (`loader.sampler`, a `ResumableSampler`) carries the epoch and position for exact
    resume. With `num_workers > 0` the loader pre-fetches batches, so a sampler's position runs
    ahead of the batches consumed; a checkpoint should record the batches it trained on instead.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    dataset = SlidingWindowDataset(token_ids, context_length, stride)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


def build_loaders(train_ids: np.ndarray, val_ids: np.ndarray, *, batch_size: int, context_length: int,
                  stride: int, eval_batches: int, seed: int,
                  ) -> tuple[DataLoader[tuple[Tensor, Tensor]], dict[str, DataLoader[tuple[Tensor, Tensor]]]]:
    """The loaders of a training run: (training batches, {"train": ..., "val": ...} evaluation batches).

    The training loader shuffles with a seeded, resumable sampler (`create_dataloader`) and drops a
    last partial batch; it must have at least one batch. Each evaluation loader gives `eval_batches`
    batches of non-overlapping windows spread evenly over its split (or all of its windows, if
    fewer): every evaluation reads the same windows, from the whole text, not its start.
    """
    train_loader = create_dataloader(train_ids, batch_size, context_length, stride, shuffle=True, seed=seed)
    # A DataLoader draws a seed for its workers from the *global* torch generator each time it is
    # iterated; with its own generator it leaves the global one (dropout's) alone, so the dropout
    # masks do not depend on where a run was stopped and resumed.
    train_loader.generator = torch.Generator()
    windows = len(cast(SlidingWindowDataset, train_loader.dataset))
    if windows < batch_size:
        raise DataError(f"the training data has {windows} windows of {context_length} tokens, fewer than "
                        f"one batch of {batch_size}; lower --batch-size, --context-length or --stride, "
                        "or use more text")
    eval_loaders = {name: _eval_loader(ids, batch_size, context_length, eval_batches)
                    for name, ids in (("train", train_ids), ("val", val_ids))}
    return train_loader, eval_loaders


def _eval_loader(token_ids: np.ndarray, batch_size: int, context_length: int, batches: int,
                 ) -> DataLoader[tuple[Tensor, Tensor]]:
    dataset = SlidingWindowDataset(token_ids, context_length, context_length)
    if len(dataset) == 0:
        raise DataError(f"{len(token_ids)} tokens make no window of {context_length} + 1 tokens to "
                        "evaluate on; use more text or a smaller --context-length")
    count = min(len(dataset), batches * batch_size)
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()  # distinct: step >= 1
    # Its own generator, as for the training loader.
    return DataLoader(Subset(dataset, picks), batch_size=batch_size, generator=torch.Generator())


def micro_batch_groups(loader: Iterable[tuple[Tensor, Tensor]], size: int,
                       ) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """The loader's batches in groups of `size` (one optimizer step each); the last may be smaller."""
    group: list[tuple[Tensor, Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
