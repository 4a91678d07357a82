"""The token cache: a source's GPT-2 token ids, tokenized once into a uint16 memmap with a JSON
sidecar.

`load_tokens(source)` returns all ids of a source (see `gpt.data.corpora`) as a 1-D uint16 array.
The first call tokenizes the text into a file under `data/cache/` and writes a sidecar describing
it; later calls map that file (`np.memmap`) instead of tokenizing again, so the ids stay on disk
until they are read. `<|endoftext|>` separates documents.

Tokenizing streams the text in pieces, cut only where the cut cannot change the tokens (see
`_safe_pieces`), and encodes them on every core (tiktoken releases the GIL), so memory stays flat
whatever the corpus size. The cache is keyed on the source's identity (path or name) and the
tokenizer, and checked against the sha256 of the source bytes: an edited file is tokenized again.
Every write is atomic, so an interrupted run leaves the old cache, no cache, or the new one whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

from gpt.base.atomic import atomic_file, write_json
from gpt.data.corpora import DataError, Source, resolve_source
from gpt.model.tokenizer import ENCODER_JSON_SHA256, ENDOFTEXT_ID, VOCAB_BPE_SHA256, get_tokenizer

ERRORS_MODES = ("strict", "replace")
"""How bytes that are not UTF-8 are handled: refused, naming the file and offset, or replaced by
U+FFFD."""
CACHE_FORMAT = 1  # bump when the cache layout or the document rules change: old caches are rebuilt
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits; little-endian on every machine
# characters per tokenizer call: big enough to amortise, small enough to stay flat
PIECE_CHARS = 1 << 20
SCAN_TOKENS = 1 << 23  # tokens per read when checking a cache for out-of-range ids


# ---------------------------------------------------------------------------------------------
# Reading: bytes -> hashed -> UTF-8 text -> pieces that tokenize independently.


class _Digest:
    """sha256 of all source bytes in order, plus a hash of the layout (each document's name and
    size).

    The two together pin the tokens: the same bytes split into different documents get different
    `<|endoftext|>` positions, and the layout hash sees that.
    """

    def __init__(self) -> None:
        self._content = hashlib.sha256()
        self._layout = hashlib.sha256()
        self.bytes = 0
        self.documents = 0

    def read(self, name: str, blocks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass one document's blocks through, hashing them; its layout entry is added at the end.
        """
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


def _content_summary(source: Source) -> dict[str, Any]:
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
    """Streams a source as (text piece, starts a document), hashing and decoding the bytes on the
    way."""

    def __init__(self, errors: str, on_bytes: Callable[[int], object]) -> None:
        self.errors = errors
        self.digest = _Digest()
        self.replaced = False  # whether errors="replace" had to substitute anything
        self._on_bytes = on_bytes

    def pieces(self, source: Source) -> Iterator[tuple[str, bool]]:
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
                    f"{name} is not valid UTF-8 at byte {offset + exc.start} "
                    f"(0x{data[exc.start]:02x}); "
                    "convert it to UTF-8, or pass --errors replace to substitute U+FFFD for bad "
                    "bytes"
                ) from None
            self.replaced = True
            return data.decode("utf-8", "replace")


# A cut between a non-space character and a following space or newline. GPT-2's pre-tokenizer regex
# (tiktoken's r50k pattern) never puts a non-space and a following space in one pre-token, and none
# of its alternatives looks behind, so a pre-token ends there and matching restarts identically
# after it. Before the cut, the last pre-token is non-space, and end-of-text changes nothing for
# those: only `\s++$` and `\s+(?!\S)` look at what follows, and both start with whitespace. BPE
# merges never cross pre-tokens, so encoding the two sides separately gives exactly the tokens of
# the whole. Python's `\s` (str.isspace) is a superset of the regex crate's Unicode `\s`, so `[^\s]`
# is safe.
_SAFE_CUT = re.compile(r"[^\s][ \n]")


def _safe_pieces(texts: Iterable[str], target: int) -> Iterator[str]:
    """Re-cut a stream of text into non-empty pieces of about `target` characters or more, only at
    `_SAFE_CUT` points, so that tokenizing the pieces one by one equals tokenizing their
    concatenation. A text with no safe cut (no spaces at all) stays in one piece."""
    buffer = ""
    # where to look for the next cut; text before it is known to hold none past target
    scan_from = 0
    for text in texts:
        buffer += text
        while len(buffer) > target:
            match = _SAFE_CUT.search(buffer, max(scan_from, target - 1))
            if match is None:
                # the last character may pair with the next text's first
                scan_from = len(buffer) - 1
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


def _batches(pieces: Iterable[tuple[str, bool]], min_chars: int) -> Iterator[list[tuple[str,
                                                                                        bool]]]:
    """Group pieces into batches of at least `min_chars`, so many tiny documents make few thread
    tasks."""
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
    """Tokenize the pieces on every core, in order, into `out` as uint16; `<|endoftext|>` goes
    before each document but the first. Returns the number of tokens written."""
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


def _cache_paths(source: Source, cache_dir: Path, tokenizer: str) -> tuple[Path, Path]:
    identity = f"{source.identity}\n{tokenizer}\n{CACHE_FORMAT}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.label)[:48] + f"-{key}"
    return cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half-written: treated as no cache
        return None
    return meta if isinstance(meta, dict) else None


def _cache_is_current(meta: dict[str, Any], source: Source, tokenizer: str, errors: str) -> bool:
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


def _build_cache(source: Source, source_arg: str, bin_path: Path, meta_path: Path, tokenizer: str,
                 errors: str) -> dict[str, Any]:
    """Tokenize `source` into `bin_path` and write its sidecar. A crash at any point leaves the old
    cache, no cache (rebuilt next time), or the new one whole; never a token file whose sidecar
    misdescribes it."""
    with tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing "
                                                                        f"{source.label}") as bar:
        reader = _Reader(errors, bar.update)
        with atomic_file(bin_path) as out:
            tokens = _write_tokens(reader.pieces(source), out)
            if tokens == 0:
                raise DataError(f"{source_arg!r} holds no text; give a source with text in it")
            meta_path.unlink(missing_ok=True)  # the old sidecar goes before the old token file does
    meta = {"format": CACHE_FORMAT, "source": source_arg, "identity": source.identity,
            "tokenizer": tokenizer,
            **reader.digest.summary(), "tokens": tokens, "dtype": TOKEN_DTYPE.str, "errors": errors,
            "replaced": reader.replaced, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(meta_path, meta)
    return meta


def load_tokens(source: str, *, data_dir: Path = Path("data"),
                errors: str = "strict") -> np.ndarray:
    """All tokens of a source (file, dir, glob, corpus name or hf:NAME) as a 1-D uint16 array (a
    memmap of the cache under `data_dir/cache/`, built on first use and rebuilt when the source
    changes).

    `errors="replace"` substitutes U+FFFD for bytes that are not UTF-8 instead of refusing the file.
    """
    if errors not in ERRORS_MODES:
        raise DataError(f"errors must be one of {', '.join(ERRORS_MODES)}, got {errors!r}")
    data_dir = Path(data_dir)
    try:
        return _load_tokens(source, data_dir, errors)
    except OSError as exc:  # an unreadable source, a read-only data_dir, a full disk
        raise DataError(
            f"reading {source!r} or writing its token cache under {data_dir / 'cache'} failed "
            f"({exc}); "
            "check the permissions and free disk space, or pass another data directory"
        ) from None


def _load_tokens(source: str, data_dir: Path, errors: str) -> np.memmap:
    resolved = resolve_source(source, data_dir)
    tokenizer = _tokenizer_id()
    bin_path, meta_path = _cache_paths(resolved, data_dir / "cache", tokenizer)
    meta = _read_meta(meta_path)
    if meta is not None and _cache_is_current(meta, resolved, tokenizer, errors):
        problem = _cache_problem(bin_path, meta.get("tokens"))
        if problem is None:
            return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r", shape=(meta["tokens"],))
        print(f"warning: token cache {bin_path} is corrupt ({problem}); rebuilding it",
              file=sys.stderr)
    meta = _build_cache(resolved, source, bin_path, meta_path, tokenizer, errors)
    return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r", shape=(meta["tokens"],))

