"""What stands in the way of reading or writing a file, said as one `UserError` line that names it.

A file this user may not read or write (`PermissionError`), a file where a directory should be, a
directory where a file should be: each is the user's to fix, and none of them is a full disk or a
damaged file, which is what the callers' own messages would otherwise say.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gpt.base.errors import UserError


def permission_denied(path: str | os.PathLike[str] | None, doing: str) -> UserError:
    """The one line for a permission denied on `path` (unknown: None) while `doing` it (read,
    write)."""
    what = f"{doing} {path}" if path is not None else f"{doing} a file it needs"
    return UserError(f"permission denied: this user may not {what}; change its permissions (or its "
                     "directory's), run as its owner, or use another path")


def check_readable(path: Path) -> None:
    """Refuse an existing file that this user may not read: what a reader that reports every failure
    as a damaged file (safetensors, torch.load) would otherwise call truncated."""
    if path.exists() and not os.access(path, os.R_OK):
        raise permission_denied(path, "read")


@contextlib.contextmanager
def permission_errors(doing: str = "read or write") -> Iterator[None]:
    """Turn a `PermissionError` raised in the block into `permission_denied` of the file it names.
    """
    try:
        yield
    except PermissionError as exc:
        raise permission_denied(exc.filename, doing) from None


def blocking_file(path: Path) -> Path | None:
    """The nearest of `path`'s parents that exists and is not a directory (a file where a directory
    must be), or None."""
    existing = next((parent for parent in Path(path).parents if parent.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None
