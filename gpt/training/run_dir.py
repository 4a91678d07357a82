"""The run directory before training: chosen, checked writable, locked for one writer, read back.

`open_run_dir(cfg, resume)` is the first thing `gpt.training.trainer.setup` does, before it builds a
model or tokenizes anything, and before anything is written:

1. which directory: `--resume`'s run (and its checkpoint), or `--out`/`--run-name` for a new run,
   whose name must be UTF-8 text;
2. writable: the nearest existing path on the way is a directory this user may write (a file in the
   way, or a read-only directory, is one `error:` line);
3. one writer: an exclusive `flock` on `<run>/.lock`, which the kernel drops when the process ends
   however it ends (even `kill -9`), so a lock is never stale. A second process on the same run
   directory (two starts at once, or a `--resume` of a run still training) gets an error naming the
   first one's process id, which the holder writes into the lock file;
4. under the lock, what the directory holds: a `--resume` reads and checks its checkpoint's training
   state (`gpt.training.resume.read_resume_state`) and best/ against it (`settle_best`: a run
   stopped between its writes of best/ and last/ resumes from the newer, and says what best/ holds);
   a new run refuses a directory that holds a checkpoint or files that are not a run's. A directory
   with the run's settings but no checkpoint (an earlier start stopped before its first save) is
   reused by a new run, and `--resume` starts it again from step 0 with its settings: both commands
   work, and each says so; a resumed run's metrics.csv is read through (a damaged one is refused);
5. the temporaries that killed processes left are removed
(`gpt.base.atomic.remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.base.atomic import remove_stale_temporaries, temporary_of
from gpt.base.errors import UserError, describe
from gpt.base.files import permission_errors
from gpt.training.metrics import METRICS_FILE, MetricsLog
from gpt.training.resume import (
    check_resume_settings,
    copy_best,
    find_resume_checkpoint,
    read_resume_state,
    settle_best,
)
from gpt.training.settings import RUN_CONFIG_FILE, TrainConfig

LOCK_FILE = ".lock"
# `--tensorboard`'s event files (gpt.training.tb), a run's too
TENSORBOARD_PREFIX = "events.out.tfevents."
CHECKPOINTS = ("last", "best")
RUN_FILES = (RUN_CONFIG_FILE, METRICS_FILE, "loss.png", *CHECKPOINTS)
"""Everything a run writes besides its lock (and `.last.old`/`.best.old`, see `gpt.base.atomic`)."""


class RunLock:
    """An exclusive `flock` on `<run>/.lock`: held from `acquire` until `release` (or the end of a
    `with` block, or of the process)."""

    def __init__(self, run_dir: Path, fd: int, made: list[Path]) -> None:
        # made: what this start created (the lock file, directories), removed if the start fails
        self.run_dir, self._fd, self._made = run_dir, fd, made

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Make `run_dir` if needed and lock it, or raise a `UserError` saying why not and who holds
        it."""
        made = _make_writable(run_dir)
        path = run_dir / LOCK_FILE
        while True:
            exclusive = 0 if path.exists() else os.O_EXCL  # O_EXCL: this start makes the file
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | exclusive, 0o666)
            except FileExistsError:  # another start made it just now: lock that one
                continue
            except OSError as exc:
                raise UserError(f"cannot create {path} ({exc.strerror}); choose another "
                                f"--out") from None
            if exclusive:
                made.insert(0, path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{run_dir} is in use: process {holder} is writing it (it holds "
                                f"{path}); "
                                "wait for it to end or stop it, or choose another "
                                "--run-name") from None
            # the file locked is still the one at `path`
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # (not one a failed start removed)
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(run_dir, fd, made)

    def release(self, *, failed: bool = False) -> None:
        """Drop the lock (closing the file drops it); after a `failed` start, also remove what this
        start made: the lock file, and the directories if it wrote nothing else into them."""
        if self._fd < 0:
            return
        for made in self._made if failed else []:  # the lock file first, then run_dir and up
            with contextlib.suppress(OSError):  # a directory that is not empty stays
                made.unlink() if made.name == LOCK_FILE else made.rmdir()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class OpenedRun:
    """A run directory locked by this process, and what `setup` starts from."""

    path: Path
    lock: RunLock
    checkpoint: Path | None = None
    """The checkpoint a `--resume` continues from; None when the run starts at step 0."""
    saved: dict[str, Any] = field(default_factory=dict)
    """Its training state, checked (`gpt.training.resume.read_resume_state`)."""


def open_run_dir(cfg: TrainConfig, resume: Path | None, *, rank: int = 0,
                 world_size: int = 1) -> OpenedRun:
    """Steps 1 to 5 of the module docstring: the run directory, locked, with a resumed run's state.

    Under torchrun (`world_size` ranks) rank 0 alone locks, checks and writes the directory; the
    others read and check the resumed state too, and hold a lock that holds nothing. A file or
    directory on the way that this user may not read or write is one `error:` line naming it."""
    with permission_errors():
        return _open_run_dir(cfg, resume, rank=rank, world_size=world_size)


def _open_run_dir(cfg: TrainConfig, resume: Path | None, *, rank: int,
                  world_size: int) -> OpenedRun:
    _check_text(Path(cfg.out) / (cfg.run_name or "") if resume is None else Path(resume),
                resume is not None)
    checkpoint = find_resume_checkpoint(Path(resume)) if resume is not None else None
    if checkpoint is not None:
        path = checkpoint.parent
    elif resume is not None:
        path = Path(resume)
    else:
        path = Path(cfg.out) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    lock = RunLock.acquire(path) if rank == 0 else RunLock(path, -1, [])
    try:
        opened = OpenedRun(path, lock, checkpoint)
        settled = None
        if checkpoint is not None and resume is not None:  # best/ as last/ says (`settle_best`)
            settled = settle_best(checkpoint, read_resume_state(checkpoint),
                                  chosen=checkpoint != Path(resume))
            opened.checkpoint, opened.saved = settled.checkpoint, settled.saved
            check_resume_settings(cfg, opened.saved, opened.checkpoint, world_size)
        elif rank == 0:
            _check_reusable(path, resume is not None)
        if rank == 0:
            if resume is not None:
                _check_metrics(path / METRICS_FILE)
            remove_stale_temporaries(path, set(RUN_FILES))
            if settled is not None and settled.note is not None:
                print(f"note: {settled.note}")
                if settled.copy_to_best:
                    copy_best(settled.checkpoint)
    except BaseException:
        lock.release(failed=True)
        raise
    return opened


def _check_text(path: Path, resumed: bool) -> None:
    """Refuse a run directory whose path is not text: bytes that are not UTF-8 (typed in a terminal
    of another encoding) reach Python as lone surrogates, and the directory, once made, would break
    the first line printed or plot titled with its name."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        fix = ("rename it in UTF-8, then resume that" if resumed
               else "give --out and --run-name in UTF-8")
        raise UserError(f"the run directory {str(path)!a} is not UTF-8 text (it holds bytes of "
                        f"another encoding); {fix}") from None


def _check_metrics(path: Path) -> None:
    """Read a resumed run's metrics.csv through (it is rewritten, the rows after the checkpoint left
    out, before the first step), so that a damaged one is refused before anything is written."""
    fix = ("restore it, or move it aside to resume with a new one (without the rows before the "
           "checkpoint)")
    try:
        rows = MetricsLog(path).rows()
    # not UTF-8; a short row (None), a word where a number belongs
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({describe(exc)}); {fix}") from None
    missing = next((key for row in rows for key in ("step", "epoch", "train_loss", "val_loss")
                    if key not in row), None)
    if missing is not None:
        raise UserError(f"{path} is damaged (its header has no {missing} column); {fix}")


def _make_writable(run_dir: Path) -> list[Path]:
    """Check that `run_dir` is, or can be made, a directory this user may write, and make it; return
    the directories made, `run_dir` first."""
    made = list(itertools.takewhile(lambda p: not p.exists(), (run_dir, *run_dir.parents)))
    existing = run_dir.parents[len(made) - 1] if made else run_dir
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, so the run directory {run_dir} cannot be made; "
                        f"choose "
                        "another --out or --run-name")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{existing} is not writable by this user, so the run directory {run_dir} "
                        f"cannot "
                        "be written; choose another --out, or make it writable")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run directory {run_dir} ({exc.strerror}); choose "
                        f"another "
                        "--out") from None
    return made


def _check_reusable(run_dir: Path, resumed: bool) -> None:
    """Whether a run may start at step 0 in `run_dir`: it holds no checkpoint and nothing but the
    files of a run that stopped before its first save (which are then replaced)."""
    names = {p.name for p in run_dir.iterdir()} - {LOCK_FILE}
    if any(name.removeprefix(".").removesuffix(".old") in CHECKPOINTS for name in names):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or "
                        f"choose "
                        "another --run-name")
    foreign = sorted(name for name in names if name not in RUN_FILES
                     and temporary_of(name) not in RUN_FILES
                     and not name.startswith(TENSORBOARD_PREFIX))
    if foreign:
        raise UserError(f"{run_dir} holds files that are not a run's ({', '.join(foreign[:3])}); "
                        f"choose "
                        "another --run-name or an empty directory")
    if names:
        print(f"{run_dir} holds a run that stopped before its first checkpoint: "
              + ("starting it again from step 0 with its settings" if resumed else "reusing the "
                                                                                   "directory"))
