"""Where and in what precision the model runs, and the process settings that make each device fast.

    pick_device("auto")               cuda, then mps, then cpu; cuda:N must be one of the visible
                                      GPUs
    configure_device(device)          make a GPU current, let float32 matmuls use TF32 on it
    training_dtype / decoding_dtype   what `--dtype auto` means for each job (they differ: see each)
    autocast(device, dtype)           mixed precision, or nothing for float32
    eval_mode(model)                  a block run in eval mode (no dropout), the model's mode
                                      restored after
    load_scaler_state(scaler, state)  a saved float16 loss scale, or a fresh one where none was
                                      saved
    skipped_step_note(scaler, step)   a float16 step the scaler skipped, as a line; a collapsed
                                      scale stops
    device_rng_state(device)          the random generator of the device in use, to save and restore
    user_error_for(exc, ...)          out of memory, a failed --compile: the one-line error and its
                                      fix
    flag_fixable_errors(fix)          turn those into that error around a command's work
    keep_freed_memory()               stop glibc handing big freed blocks back to the kernel
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from gpt.base.errors import TrainingDiverged, UserError, describe, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """`auto` is the fastest device present (cuda, then mps, then cpu); other names must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"--device {name} is not available on this machine; use --device auto")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
        count = torch.cuda.device_count()  # the GPUs CUDA_VISIBLE_DEVICES lets this process see
        raise UserError(f"--device {name}: this machine has {count} visible CUDA GPU(s), cuda:0 to "
                        f"cuda:{count - 1}; use one of those, or --device cuda")
    if device.type == "mps" and device.index not in (None, 0):
        raise UserError(f"--device {name}: there is one Apple GPU, mps; use --device mps")
    return device


def configure_device(device: torch.device) -> None:
    """The process-wide settings for running on `device`; call it once, after `pick_device`.

    On CUDA, `cuda:N` becomes the current GPU: what torch asks of "the" GPU (autocast's bfloat16
    check, the GPU memory is pinned for, new streams) is then asked of it, not of cuda:0 (plain
    `cuda` is the current GPU already). And float32 matrix products may run in TF32 (inputs rounded
    to a 10-bit mantissa, float32 accumulation) on the tensor cores of Ampere and newer GPUs, as
    PyTorch recommends for training; older GPUs have no TF32 and ignore it, and with mixed precision
    the products are bf16 or float16 anyway. Not undone afterwards.
    """
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matrix products in hardware, rather than emulating them (far
    slower).

    CUDA: compute capability 8.0 (Ampere) or newer, asked of `device` itself. Not
    `torch.cuda.is_bf16_supported()`: it counts emulation too, so it says yes on a T4, V100 or RTX
    20xx, whose tensor cores run float16 but not bf16. CPU: oneDNN's AVX512-BF16 or AMX. Apple GPUs:
    no (bf16 exists there from macOS 14, but `--dtype auto` does not pick it).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _refuse_unsupported(dtype: torch.dtype, device: torch.device) -> None:
    """A UserError for an asked-for dtype that `device` cannot run (torch would fall back silently).
    """
    if (dtype == torch.bfloat16 and device.type == "mps"
            and not torch.backends.mps.is_macos_or_newer(14, 0)):
        # Before macOS 14 torch turns bfloat16 autocast off with a warning: a float32 run that says
        # bf16.
        raise UserError("--dtype bfloat16 on an Apple GPU needs macOS 14 or newer; use --dtype "
                        "float32 (or float16 with generate.py)")


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training with `--dtype name` on `device`.

    `auto` picks bfloat16 only where the hardware has it (`has_native_bf16`): on a CPU with
    AVX512-BF16 a bf16 matmul ran several times the float32 rate, where bf16 is emulated hundreds of
    times slower (BENCHMARKS.md). A CUDA GPU without it gets float16, which its tensor cores run,
    with the loss scaler; an Apple GPU float32. float16 needs the loss scaler, which the trainer
    runs on CUDA only.
    """
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.float16 and device.type != "cuda":
            raise UserError(f"--dtype {name} needs a CUDA GPU; use --dtype bfloat16 or float32 on "
                            f"{device}")
        _refuse_unsupported(dtype, device)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and has_native_bf16(device) else torch.float32


def decoding_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the weights are cast to for decoding with `--dtype name`.

    `auto` is bfloat16 on every CPU and on CUDA GPUs that have it in hardware, float16 on the others
    and on Apple GPUs: decoding one token streams every weight from memory, so halving their bytes
    made cached decoding faster even where bf16 arithmetic is emulated on a CPU (BENCHMARKS.md).
    `--dtype float32` keeps the exact weights.
    """
    if name != "auto":
        _refuse_unsupported(DTYPES[name], device)
        return DTYPES[name]
    if device.type == "mps" or (device.type == "cuda" and not has_native_bf16(device)):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for `dtype` on `device`; float32 means no autocast (full precision)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class Switchable(Protocol):
    """A model with a training mode (`torch.nn.Module` and `gpt.eval.perplexity.LanguageModel` are).
    """

    training: bool

    def train(self, mode: bool = True) -> Any: ...


@contextlib.contextmanager
def eval_mode(model: Switchable) -> Iterator[None]:
    """Run the block with `model` in eval mode (no dropout), then put it back in the mode it was in,
    even on an error: evaluation, decoding and analysis may be called in the middle of training."""
    was_training = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(was_training)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Put a saved GradScaler state (`scaler.state_dict()`) into `scaler`.

    A scaler that was disabled (a run in any dtype but float16) saves an empty state, which an
    enabled one refuses: a run resumed with `--dtype float16` then starts from the initial loss
    scale, as a new float16 run does. A disabled scaler ignores whatever it is given.
    """
    if state:
        scaler.load_state_dict(state)


def skipped_step_note(scaler: torch.amp.GradScaler, step: int) -> str:
    """The line saying that float16 overflowed at `step` and the scaler skipped it (ask after
    `scaler.update()`, which lowered the scale).

    Raises `TrainingDiverged` once the scale is below 1: the gradients then overflow even unscaled,
    and the run would go on skipping every step while its scale halves towards 0.
    """
    scale = scaler.get_scale()
    if scale < 1.0:
        raise TrainingDiverged(f"float16 overflowed at every step until the loss scale fell to "
                               f"{scale:g} (step {step}); use --dtype bfloat16 or float32, or "
                               f"lower --lr")
    return f"step {step} skipped (float16 overflow, loss scale now {scale:g})"


def device_rng_state(device: torch.device) -> dict[str, Any] | None:
    """The state of `device`'s random generator (dropout's, on a GPU), for a checkpoint; None on the
    CPU, whose generator `torch.get_rng_state()` covers.

    Only the device in use: the other GPUs' generators drew nothing for this run, and a state saved
    for each of a 4-GPU box's GPUs could not be restored by index where fewer are visible.
    """
    if device.type == "cuda":
        return {"type": "cuda", "state": torch.cuda.get_rng_state(device)}
    if device.type == "mps":
        return {"type": "mps", "state": torch.mps.get_rng_state()}
    return None


def set_device_rng_state(device: torch.device, saved: dict[str, Any] | None) -> bool:
    """Restore what `device_rng_state` saved, onto `device` (whichever GPU number saved it).

    False where nothing applies: nothing was saved (a CPU run), or it was saved on another kind of
    device; the resumed run's dropout then draws other numbers than an unbroken run would have.
    """
    if saved is None or saved["type"] != device.type:
        return False
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["state"], device)
    else:
        torch.mps.set_rng_state(saved["state"])
    return True


# What a RuntimeError says when an allocator gave up: CUDA's and MPS's (older torch raised those as
# a plain RuntimeError), cuBLAS's when it cannot get its workspace, and the CPU's.
_OUT_OF_MEMORY = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|can't allocate memory")


def user_error_for(exc: BaseException, out_of_memory_fix: str) -> UserError | None:
    """The one-line `UserError` for a failure a flag can fix, or None for any other (a bug, which
    keeps its traceback). `out_of_memory_fix` names the caller's flags that need less memory.

    Out of memory: CUDA's and MPS's (`torch.OutOfMemoryError`, or a RuntimeError saying so) and the
    CPU allocator's. A failed `--compile`: anything torch.compile's tracer or compiler raises (no
    Triton, no working C++ compiler, an unsupported operation), reported with what the compiler
    itself raised.
    """
    cause = exc
    # what the compiler raised, unwrapped
    while getattr(cause, "inner_exception", None) is not None:
        cause = cause.inner_exception  # type: ignore[attr-defined]
    if isinstance(cause, torch.OutOfMemoryError) or (
            isinstance(cause, RuntimeError) and _OUT_OF_MEMORY.search(str(cause))):
        # CUDA's message runs on for a paragraph; its first two sentences say what was asked for.
        sentences = re.split(r"(?<=\.)\s+", first_line(cause))
        return UserError(f"out of memory ({' '.join(sentences[:2]).rstrip('.')}); "
                         f"{out_of_memory_fix}")
    if any(cls.__module__.startswith(("torch._dynamo", "torch._inductor", "triton"))
           for cls in type(exc).__mro__):
        return UserError(f"--compile failed ({describe(cause)}); run without --compile (it needs a "
                         "working C++ compiler on a CPU, and Triton on a GPU)")
    return None


@contextlib.contextmanager
def flag_fixable_errors(out_of_memory_fix: str) -> Iterator[None]:
    """Raise `user_error_for`'s one-line `UserError` for what the block raises, where it has one."""
    try:
        yield
    except Exception as exc:
        error = user_error_for(exc, out_of_memory_fix)
        if error is None:
            raise
        raise error from None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel. True if
    applied.

    PyTorch's CPU tensors come from malloc. glibc serves a block of 32 MiB or more with a fresh
    mmap and unmaps it on free, so every step's big temporaries (a batch of logits is 8 x 256 x
    50257 floats, 411 MB) arrive as untouched pages that the kernel must fault in and zero one by
    one. Measured on the CPU bench config: 7.9M page faults in 21 steps, half the step time spent in
    the kernel; with this, 0.6M, and a step 2-2.6x faster (BENCHMARKS.md). The price: memory
    freed by the process stays mapped to it (its peak RSS, not more), as with jemalloc or tcmalloc.
    A no-op off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Serve blocks up to 1 GiB from the heap, and never trim the heap's top back to the kernel.
    served_from_heap = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    kept = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(served_from_heap and kept)
