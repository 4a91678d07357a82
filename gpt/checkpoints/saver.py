"""Writing training checkpoints while training goes on: `CheckpointSaver`.

A checkpoint of GPT-2 small (the weights and AdamW's two moments) is over a gigabyte, and writing it
to disk and flushing it takes seconds in which a blocking save stops training. In the background
mode a save first copies everything the checkpoint holds to the CPU, at the step and in the
training thread, so the files are exactly what a blocking save at that step would write; a thread
then writes the copy with `gpt.checkpoints.checkpoint.write_checkpoint`, atomically as ever, while
the next steps run. The price is CPU memory for one copy of the weights and optimizer state.

At most one save is in flight: the next save, and `wait` (called on leaving a `with` block, hence at
the end of training, on Ctrl-C and on an error), wait for it first and raise its error, if it had
one. A kill in the middle of a write leaves the previous checkpoint whole (`gpt.base.atomic`).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

from gpt.checkpoints.checkpoint import stored_state, write_checkpoint
from gpt.model.config import GPTConfig
from gpt.model.model import GPT


def cpu_copy(value: Any) -> Any:
    """`value` with every tensor in it (in dicts, lists and tuples, at any depth) replaced by a copy
    on the CPU that later in-place updates of the original do not reach; other values are kept."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item) for item in value)
    return value


def without_optimizer_state(train_state: dict[str, Any]) -> dict[str, Any]:
    """`train_state` without its "optimizer" entry, marked `"without_optimizer": True` so that
    resuming from it can say why it cannot (`--best-weights-only`: best/ a third of a full
    checkpoint's size)."""
    return {**{k: v for k, v in train_state.items() if k != "optimizer"}, "without_optimizer": True}


class CheckpointSaver:
    """Writes training checkpoints one at a time: in a background thread (`background`), or at once.
    """

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, model: GPT, train_state: dict[str, Any], directories: Sequence[Path], *,
             without_optimizer: Collection[Path] = ()) -> None:
        """Write the checkpoint of `model` and `train_state` (see
        `gpt.checkpoints.checkpoint.save_checkpoint`) into each of `directories` in turn; in the
        background mode this returns once the copy is taken.
        Those of `directories` in `without_optimizer` get `without_optimizer_state(train_state)`.
        """
        self.wait()
        if not directories:
            return
        tensors = stored_state(model)
        if not self.background:
            self._write(tensors, model.config, train_state, directories, without_optimizer)
            return
        args = (cpu_copy(tensors), model.config, cpu_copy(train_state), list(directories),
                set(without_optimizer))
        # Not a daemon: should the main thread end without `wait`, the process still finishes the
        # write.
        self._thread = threading.Thread(target=self._write_catching, args=args,
                                        name="checkpoint-saver")
        self._thread.start()

    def wait(self) -> None:
        """Return once no save is in flight; raise the error of the one that just ended, if it
        failed (its directories then still hold their previous checkpoints)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    @staticmethod
    def _write(tensors: Mapping[str, Tensor], cfg: GPTConfig, train_state: dict[str, Any],
               directories: Sequence[Path], without_optimizer: Collection[Path]) -> None:
        for directory in directories:
            state = (without_optimizer_state(train_state) if directory in without_optimizer
                     else train_state)
            write_checkpoint(tensors, cfg, state, directory)

    def _write_catching(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as exc:  # handed to the training thread by `wait`
            self._error = exc

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.wait()
