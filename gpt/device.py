"""Where and in what precision the model runs, and the process settings that make the CPU fast.

    pick_device("auto")          cuda, then mps, then cpu
    training_dtype / decoding_dtype   what `--dtype auto` means for each job (they differ: see each)
    autocast(device, dtype)      mixed precision, or nothing for float32
    keep_freed_memory()          stop glibc handing big freed blocks back to the kernel
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch

from gpt.errors import UserError

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
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"--device {name} is not available on this machine; use --device auto")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls in hardware here (AVX512-BF16 or AMX), not emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training with `--dtype name` on `device`.

    On CPU, `auto` picks bfloat16 only where the hardware has it: a bf16 matmul ran ~4x the float32
    rate on an AVX512-BF16 EPYC (BENCHMARKS.md), but ~350x slower than float32 where bf16 is emulated
    (an AVX2-only EPYC). float16 needs a loss scaler, which the trainer runs on CUDA only.
    """
    if name != "auto":
        if DTYPES[name] == torch.float16 and device.type != "cuda":
            raise UserError(f"--dtype {name} needs a CUDA GPU; use --dtype bfloat16 or float32 on {device}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def decoding_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the weights are cast to for decoding with `--dtype name`.

    `auto` is bfloat16 on every CPU (float16 on Apple GPUs and CUDA GPUs without bf16): decoding one
    token streams every weight from memory, so halving their bytes made cached decoding faster even
    where bf16 arithmetic is emulated (BENCHMARKS.md). `--dtype float32` keeps the exact weights.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "mps" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16  # MPS has bf16 only from macOS 14; float16 works on every version
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for `dtype` on `device`; float32 means no autocast (full precision)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel. True if applied.

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
