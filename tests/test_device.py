"""Device and precision choices, and the allocator setting that keeps big temporaries cheap. The GPU
answers (device count, compute capability, macOS version) are mocked: these run on any CPU."""

import subprocess
import sys
import textwrap

import pytest
import torch

from gpt.base.device import configure_device, decoding_dtype, pick_device, training_dtype
from gpt.base.errors import UserError

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


def fake_gpus(monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]]) -> None:
    """CUDA GPUs of these compute capabilities; cuda:0 is the current one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[torch.device(device or "cuda").index or 0])
    # What torch says on every GPU since Pascal: emulated bf16 counts as supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_auto_dtype_on_cuda_is_bf16_from_ampere_and_float16_before_asked_of_the_chosen_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, [(8, 0), (7, 5)])  # an A100 as cuda:0, a T4 as cuda:1
    ampere, turing = pick_device("cuda:0"), pick_device("cuda:1")
    assert training_dtype("auto", ampere) == decoding_dtype("auto", ampere) == torch.bfloat16
    assert training_dtype("auto", turing) == decoding_dtype("auto", turing) == torch.float16
    assert training_dtype("auto", pick_device("cuda")) == torch.bfloat16  # the current GPU: cuda:0
    fake_gpus(monkeypatch, [(7, 0)])  # a V100
    assert training_dtype("auto", pick_device("cuda")) == torch.float16
    # asked for: emulated, slow
    assert training_dtype("bfloat16", pick_device("cuda")) == torch.bfloat16
    fake_gpus(monkeypatch, [(9, 0)])  # an H100
    assert training_dtype("auto", pick_device("cuda")) == torch.bfloat16


def test_a_cuda_device_beyond_the_visible_gpus_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: E501
    fake_gpus(monkeypatch, [(8, 6), (8, 6)])
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError) as caught:
        pick_device("cuda:2")
    assert str(caught.value) == ("--device cuda:2: this machine has 2 visible CUDA GPU(s), cuda:0 "
                                 "to cuda:1; use one of those, or --device cuda")


def test_configure_device_makes_the_chosen_gpu_current_and_lets_float32_matmuls_use_tf32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, [(8, 0), (8, 0)])
    current: list[int] = []
    # Under the real torch.cuda.set_device, which takes only a device with an index.
    monkeypatch.setattr(torch._C, "_cuda_setDevice", current.append, raising=False)
    precision = torch.get_float32_matmul_precision()
    try:
        configure_device(CPU)
        # the CPU: untouched
        assert current == [] and torch.get_float32_matmul_precision() == "highest"
        configure_device(pick_device("cuda:1"))
        assert current == [1]
        assert torch.get_float32_matmul_precision() == "high"  # TF32 allowed
        configure_device(pick_device("cuda"))  # the current GPU already
        assert current == [1]
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize(("macos_14", "expected"), [(True, torch.bfloat16), (False, None)])
def test_bfloat16_on_an_apple_gpu_needs_macos_14(monkeypatch: pytest.MonkeyPatch, macos_14: bool,
                                                 expected: torch.dtype | None) -> None:
    """Before macOS 14 torch turns bf16 autocast off with a warning: the run would be float32."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14)
    mps = pick_device("mps")
    for choose in (training_dtype, decoding_dtype):
        if expected is not None:
            assert choose("bfloat16", mps) == expected
        else:
            with pytest.raises(UserError, match="needs macOS 14 or newer; use --dtype float32"):
                choose("bf16", mps)
    assert training_dtype("auto", mps) == torch.float32 and decoding_dtype("auto",
                                                                           mps) == torch.float16
    with pytest.raises(UserError, match="there is one Apple GPU"):
        pick_device("mps:1")


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
        from gpt.base.device import keep_freed_memory
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
