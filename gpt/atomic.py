"""Writing files and directories so that a kill at any moment leaves the old version or the new one
whole, never half of one: the token cache and downloads (`gpt.data`), checkpoints and exports
(`gpt.checkpoint`, `gpt.weights`), the loss plot, the run's settings and a resumed run's metrics.csv
(`gpt.plot`, `gpt.trainer`, `gpt.metrics`).

A file (`atomic_file`) is written under a temporary name beside it, flushed to disk, then renamed
over the target in one step (`os.replace`).

A directory cannot be replaced in one step, so `atomic_directory` takes four:

    1. write  .<name>.tmp/            (the old <name>/ is untouched)
    2. rename <name>/ -> .<name>.old/ (only if it exists)
    3. rename .<name>.tmp/ -> <name>/
    4. delete .<name>.old/

A kill between 2 and 3 leaves no <name>/ but a whole .<name>.old/, which `resolve_directory` falls
back to, so readers that go through it always find a complete directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (a no-op for directories on Windows,
    which cannot open them)."""
    if os.name != "posix" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file open for writing that becomes `path` only if the block completes: readers never
    see a partial file, and an exception or interrupt leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open rather than mkstemp: mode 0o666 lets the umask decide, as for any ordinary file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)  # make the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)  # already gone after a successful rename


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON in `path`, written with `atomic_file`."""
    with atomic_file(path) as out:
        out.write((json.dumps(data, indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on a clean exit it replaces `target` (steps above)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_directory(path: Path) -> Path:
    """The directory to read for `path`, recovering from a kill between steps 2 and 3 above."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        return old
    return path
