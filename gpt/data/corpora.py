"""Text sources: what a `--data` string names, read as a sequence of documents of bytes.

A source is a text file, a directory (every `*.txt` below it, in sorted order), a glob, a corpus
name from `CORPORA`, or a Hugging Face dataset `hf:NAME[[:CONFIG]:SPLIT]` streamed with `datasets`.
Each file (or corpus topic, or dataset record) is one document. `resolve_source` turns the string
into a `Source` and checks what can be checked before any reading (the file exists, the glob
matches, the spec parses), so a bad `--data` fails at once; the documents are read only when they
are iterated.

This module knows nothing of tokens: the token cache (`gpt.data.token_cache`) hashes and tokenizes
the documents, and decides whether it needs to read them at all. That is why the downloadable
corpora are fetched here, once and checked by sha256, but a Hugging Face stream is opened only when
the cache asks for its documents: a dataset tokenized before loads offline.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt.base.atomic import atomic_file
from gpt.base.errors import UserError, first_line


class DataError(UserError, ValueError):
    """Unusable data or data settings (a `ValueError`, so plain Python callers can catch it)."""


CORPORA: dict[str, str] = {
    "default": "Python's own help topics (pydoc_data): built in, works offline",
    "the-verdict": "Edith Wharton's short story used in the book (~5k tokens), downloaded once",
    "tinyshakespeare": "Karpathy's tiny Shakespeare (~338k tokens), downloaded once",
}
"""The corpus names a source may be, each with a one-line description."""

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
# A reachable hub accepts a connection well within this; an unreachable one is then known at once
# instead of after huggingface_hub's retries.
HUB_CONNECT_TIMEOUT_S = 3.0
READ_BYTES = 1 << 20  # bytes read from a file at a time


@dataclass(frozen=True)
class Source:
    """A resolved source: its names, and its documents on demand."""

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


def resolve_source(source: str, data_dir: Path) -> Source:
    """The `Source` a string names; a downloadable corpus is fetched into `data_dir` first if
    missing.

    A corpus name wins over a file or directory of the same name (`./default` names the file).
    """
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
        f"{source!r} is not an existing file, directory, glob or corpus name; check the path, or "
        f"use one of the corpora {', '.join(CORPORA)} or {HF_PREFIX}NAME (a Hugging Face dataset)"
    )


# ---------------------------------------------------------------------------------------------
# Local files.


def _directory_source(root: Path) -> Source:
    # Sorted by path components, so the order is the same on every machine and file system.
    paths = sorted((p for p in root.rglob("*.txt") if p.is_file()),
                   key=lambda p: p.relative_to(root).parts)
    if not paths:
        raise DataError(f"directory {root} holds no .txt files; put text files in it or give a "
                        f"file instead")
    _require_some_text(paths, f"directory {root}")
    return _files_source(root.resolve().name, f"dir:{root.resolve()}", paths)


def _glob_source(pattern: str) -> Source:
    expanded = os.path.expanduser(pattern)
    paths = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"no files match {pattern!r}; check the pattern (quote it so the shell "
                        f"keeps it)")
    _require_some_text(paths, f"glob {pattern!r}")
    return _files_source("glob", f"glob:{os.path.abspath(expanded)}", paths)


def _require_some_text(paths: list[Path], what: str) -> None:
    if all(p.stat().st_size == 0 for p in paths):
        raise DataError(f"all {len(paths)} files of {what} are empty; give files with text in them")


def _files_source(label: str, identity: str, paths: list[Path]) -> Source:
    def documents() -> Iterator[tuple[str, Iterable[bytes]]]:
        for path in paths:
            yield str(path), _read_blocks(path)

    return Source(label, identity, documents, sum(p.stat().st_size for p in paths), hashable=True)


def _read_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while block := file.read(READ_BYTES):
            yield block


# ---------------------------------------------------------------------------------------------
# Built-in and downloadable corpora.


def _default_source() -> Source:
    try:  # imported here: a big module of strings, and some Python builds leave it out
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

    return Source("default", "corpus:default", documents, sum(len(d) for _, d in texts),
                  hashable=True)


def _fetch_corpus(name: str, data_dir: Path) -> Path:
    """`data_dir/<name>.txt`, downloaded first if missing; its sha256 is checked either way."""
    spec = DOWNLOADS[name]
    path = data_dir / f"{name}.txt"
    if path.exists():
        actual = _sha256_file(path)
        if actual != spec.sha256:
            raise DataError(
                f"{path} has sha256 {actual}, expected {spec.sha256}; delete it so {name} is "
                f"downloaded again, or replace it with the file from {spec.url}"
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
                f"cannot download {name} from {spec.url} ({first_line(reason)}); check the "
                f"network, or download that file by hand and save it as {path}"
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
# Hugging Face datasets, streamed.


def _hf_source(source: str) -> Source:
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
        try:  # imported here: an optional extra, and slow to import
            import datasets
        except ImportError:
            raise DataError(
                f"{source!r} needs the optional 'datasets' package; install it with: pip install "
                f"-e \".[hf]\""
            ) from None
        # A dataset directory on disk needs no hub.
        if not Path(name).exists() and (reason := hub_unreachable()) is not None:
            raise DataError(
                f"cannot open {source!r}: the Hugging Face hub cannot be reached ({reason}); check "
                f"the "
                "network, or save the dataset's text as .txt files and pass their directory"
            )
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
                    f"reading {source!r} failed at record {index}: {first_line(exc)}; check the "
                    f"network, "
                    "retry"
                ) from None
            if "text" not in record:
                raise DataError(
                    f"{source!r} has no 'text' field (fields: {', '.join(map(str, record))}); use "
                    f"a dataset "
                    "with a 'text' column"
                )
            # Lone surrogates cannot be UTF-8; "replace" keeps a malformed record from stopping the
            # run.
            yield f"{source} record {index}", (str(record["text"]).encode("utf-8", "replace"),)
            index += 1

    return Source(name.replace("/", "_"), identity, documents, total_bytes=None, hashable=False)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (`HF_ENDPOINT`, else huggingface.co) cannot be reached from here, or
    None if it can, or if a proxy decides.

    One connection attempt with a short timeout. Offline, `huggingface_hub` retries with growing
    pauses and a line of output per retry before it gives up, so a caller that asks first fails at
    once with a clear reason. Behind a proxy the proxy connects to the hub, so there is nothing to
    check from here.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                             "all_proxy")):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:  # no name resolution, no route, refused, timed out
        return f"{host}:{port}: {first_line(exc)}"
