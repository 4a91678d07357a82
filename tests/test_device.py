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
def test_keep_freed_memory_keeps_big_temporaries_resident_and_stops_their_page_faults() -> None:
    """The same 400 MB temporary made and freed 8 times. Without the setting glibc unmaps it on
    free (resident memory drops back) and each new one arrives as fresh pages the kernel faults in
    (~98k faults each); with it the freed block stays resident and is reused.

    The fault bound allows two buffers' worth: the kernel may fault in resident pages again for its
    own reasons (NUMA balancing's hinting faults on a multi-node host), which no allocator prevents.
    """
    script = textwrap.dedent("""
        import os, resource, sys, torch
        from gpt.device import keep_freed_memory
        page = os.sysconf("SC_PAGE_SIZE")
        def resident_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page / 2**20
        applied = keep_freed_memory() if sys.argv[1] == "keep" else None
        for _ in range(2):  # first touches: these faults happen either way
            torch.ones(100_000_000).sum()
        before_faults, before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, resident_mb()
        for _ in range(8):
            torch.ones(100_000_000).sum()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before_faults
        print(applied, faults, before_mb)
    """)
    runs = {}
    for mode in ("keep", "default"):
        applied, faults, resident_mb = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
            timeout=120).stdout.split()
        runs[mode] = int(faults), float(resident_mb)
        if mode == "keep":
            assert applied == "True"
    one_buffer_pages = 100_000_000 * 4 // 4096
    assert runs["default"][0] > 8 * 0.9 * one_buffer_pages
    assert runs["keep"][0] < 2 * one_buffer_pages
    assert runs["keep"][1] > runs["default"][1] + 350  # the freed 400 MB stayed with the process
