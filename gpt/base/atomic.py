"""Writing files and directories so that a kill at any moment leaves the old version or the new one
whole, never half of one: the token cache and downloads (`gpt.data.windows`), checkpoints and
exports (`gpt.checkpoints.checkpoint`, `gpt.checkpoints.weights`), the loss plot, the run's settings
and a resumed run's metrics.csv (`gpt.base.plot`, `gpt.training.trainer`, `gpt.training.metrics`).

A file (`atomic_file`) is written under a temporary name beside it, flushed to disk, then renamed
over the target in one step (`os.replace`).

A directory cannot be replaced in one step, so `atomic_directory` takes four:

    1. write  .<name>.tmp.<pid>.<hex>/            (the old <name>/ is untouched)
    2. rename <name>/ -> .<name>.old/             (only if it exists)
    3. rename .<name>.tmp.<pid>.<hex>/ -> <name>/
    4. delete .<name>.old/

A kill between 2 and 3 leaves no <name>/ but a whole .<name>.old/, which `resolve_directory` falls
back to, so readers that go through it always find a complete directory. Two writes of the same
directory must not overlap (step 2 of one would move the other's result): a run directory has one
writing process (`gpt.training.run_dir`), which saves each checkpoint directory one write at a time.

Temporary names carry the writing process's id and a random part, so two processes (or two writes
in one) never share one. An exception removes the temporary; a kill (SIGKILL, power loss) cannot,
and `remove_stale_temporaries` deletes those of processes that are gone. A write that fails because
the disk is full, a file-size limit is reached or the file system refuses it raises a `UserError`
naming the target, which keeps its previous version; one that fails for what is in the way (a
permission denied, a file where a directory must be) says that instead (`gpt.base.files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt.base.errors import UserError, first_line
from gpt.base.files import blocking_file, permission_denied

# The permissions an ordinary new file gets (0o666 less the umask), read once at import because
# os.umask can only be read by setting it, which would race with threads creating files.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

# .<name>.tmp.<pid>.<hex>; older versions wrote .<name>.tmp and .<name>.<12 hex>.tmp, without a pid.
_TEMPORARY = re.compile(r"\.(?P<name>.+?)"
                        r"(?:\.[0-9a-f]{12}\.tmp|\.tmp(?:\.(?P<pid>\d+)\.[0-9a-f]{8})?)")


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


def _temporary(path: Path) -> Path:
    """A name beside `path` that no other write uses: this process's id and a random part."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def _write_failed(exc: BaseException) -> bool:
    """Whether `exc` says that a file could not be written (disk full, file-size limit, a refusing
    file system), as the writers report it: an `OSError`; safetensors' "I/O error ... (os error
    N)"; torch.save's zip writer, whose failure ("inline_container") carries no errno."""
    text = str(exc)
    return isinstance(exc, OSError) or "(os error" in text or "inline_container" in text


@contextlib.contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn a failed write of `target` (see `_write_failed`) into a `UserError` that names it."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or not _write_failed(exc):
            raise
        raise _in_the_way(Path(target), exc) or UserError(
            f"cannot write {target} ({first_line(exc)}): the disk is full, a file-size limit "
            f"(ulimit -f) was reached or the file system refused; {target} keeps its previous "
            f"version: free space (or fix "
            "the file system), then run again") from exc


def _in_the_way(target: Path, exc: Exception) -> UserError | None:
    """The one line for a write of `target` that failed for what is in its way, not for want of
    space: a permission denied (on it, or on a file read while writing it), a file where one of its
    directories must be, a directory where it must be a file; None for any other failure."""
    if isinstance(exc, PermissionError):
        failed = Path(exc.filename) if exc.filename is not None else target
        written = failed == target.parent or target.parent in failed.parents  # else a file read
        return permission_denied(target if written else exc.filename, "write" if written
                                 else "read")
    blocker = blocking_file(target)
    if blocker is not None:
        return UserError(f"cannot write {target}: {blocker} is a file, not a directory; choose a "
                         f"path "
                         "under a directory")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"cannot write {target}: it is a directory; give the name of a file")
    return None


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file open for writing that becomes `path` only if the block completes: readers never
    see a partial file, and an exception or interrupt leaves nothing behind."""
    path = Path(path)
    tmp = _temporary(path)
    # Before write_errors: a file where a directory should be is not a full disk (the caller says
    # what).
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_errors(path):
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
    tmp, old = _temporary(target), target.with_name(f".{target.name}.old")
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    # safetensors writes its files 0600; a checkpoint is shared like any other file.
                    os.chmod(file, FILE_MODE)
                    _fsync(file)
            _fsync(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)


def copy_directory(source: Path, target: Path) -> None:
    """Make `target` a copy of the directory `source` (files and folders in it), with
    `atomic_directory`."""
    with atomic_directory(target) as tmp:
        for item in Path(source).iterdir():
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)


def temporary_of(filename: str) -> str | None:
    """The name whose temporary `filename` is (`.loss.png.tmp.<pid>.<hex>` -> `loss.png`), or None.
    """
    found = _TEMPORARY.fullmatch(filename)
    return found["name"] if found else None


def remove_stale_temporaries(directory: Path, targets: set[str]) -> list[Path]:
    """Delete the temporaries of the files or directories named `targets` in `directory` that
    processes which are gone left behind (killed mid-write); return them. Those of a process still
    running are kept: it may be writing them now."""
    removed = []
    for path in Path(directory).iterdir():
        found = _TEMPORARY.fullmatch(path.name)
        if found and found["name"] in targets and not (found["pid"] and _alive(int(found["pid"]))):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def resolve_directory(path: Path) -> Path:
    """The directory to read for `path`, recovering from a kill between steps 2 and 3 above."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        return old
    return path
