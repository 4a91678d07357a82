"""Device and precision choices, and the allocator setting that keeps big temporaries cheap."""

import subprocess
import sys
import textwrap

import pytest
import torch

from gpt.device import decoding_dtype, pick_device, training_dtype
from gpt.errors import UserError

CPU = torch.device("cpu")


def test_pick_device() -> None:
    assert pick_device("cpu") == CPU
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UserError, match="unknown --device 'tpu9'"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda is not available on this machine"):
            pick_device("cuda")


def test_training_uses_bf16_on_cpu_only_where_the_hardware_has_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert training_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert training_dtype("auto", CPU) == torch.float32
    assert training_dtype("bf16", CPU) == training_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        training_dtype("float16", CPU)


def test_decoding_uses_bf16_on_every_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert decoding_dtype("auto", CPU) == torch.bfloat16
    assert decoding_dtype("float32", CPU) == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_big_temporaries() -> None:
    """The same 400 MB temporary made and freed 5 times: without the setting each one arrives as
    fresh pages the kernel faults in (~100k faults each), with it the freed block is reused."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from gpt.device import keep_freed_memory
        applied = keep_freed_memory() if sys.argv[1] == "keep" else None
        for _ in range(2):  # first touches: these faults happen either way
            torch.ones(100_000_000).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(100_000_000).sum()
        print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                             check=True, timeout=120).stdout.split()
        faults[mode] = int(out[1])
        if mode == "keep":
            assert out[0] == "True"
    assert faults["default"] > 5 * 90_000  # 5 x 400 MB / 4 KiB pages
    assert faults["keep"] < 5_000
