"""Ctrl-C as a flag the training loop reads between steps, so that a stop leaves a consistent
checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from tqdm import tqdm


@contextlib.contextmanager
def ctrl_c_flag() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop reads between steps; the second interrupts at
    once.

    Stopping between steps, never inside one, is what makes the checkpoint saved after a Ctrl-C
    consistent: no half-accumulated gradients, no half-updated optimizer. Yields `interrupted()`.
    """
    pressed = threading.Event()
    # only the main thread gets signals
    if threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def handler(signum: int, frame: object) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()
        tqdm.write("Ctrl-C: stopping after this step and saving last/ (press again to quit at "
                   "once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
