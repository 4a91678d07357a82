"""The CUDA and MPS paths, checked on the CPU: float16 with the chunked LM head, the loss scaler's
state across dtypes, the device's random generator in a checkpoint, failures turned into one line,
and the GPU smoke script run on the CPU. The GPU functions are mocked where a GPU would answer."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_runs import TOKENS, assert_same_params, params, tiny
from torch._dynamo.exc import BackendCompilerFailed

from gpt.base.device import (
    device_rng_state,
    load_scaler_state,
    pick_device,
    set_device_rng_state,
    user_error_for,
)
from gpt.base.errors import TrainingDiverged, UserError
from gpt.base.rng import rng_state, set_rng_state
from gpt.checkpoints.checkpoint import load_train_state
from gpt.model.loss import head_loss
from gpt.training import trainer
from gpt.training.optim import build_optimizer
from gpt.training.resume import restore

LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale
OOM_FIX = "lower --batch-size"


# ---- float16 and the chunked LM head -----------------------------------------------------------


def head_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `head_loss` as a float16 training step gets them: the loss times a GradScaler's
    scale, then divided again (what `scaler.unscale_` does)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = head_loss(h, w, targets, chunk)
    (loss * LOSS_SCALE).backward()
    assert h.grad is not None and w.grad is not None
    return h.grad / LOSS_SCALE, w.grad / LOSS_SCALE


def test_float16_chunked_head_loss_keeps_every_head_row_gradient_and_the_unchunked_precision() -> None:  # noqa: E501
    """A probability near 1/V divided by the row count (1/16384/4096, below float16's smallest
    subnormal) was stored as 0 before the loss scale was applied: most of the head's rows (those of
    tokens no row targets) got an exactly zero gradient. Unchunked, float16 keeps them all."""
    hidden, weight = torch.randn(4096, 16), 0.02 * torch.randn(16384, 16)
    targets = torch.randint(0, 16384, (4096,))
    reference = head_grads(hidden, weight, targets, 0, torch.float32)
    zero_rows, errors = {}, {}
    for chunk in (0, 512):
        grad_hidden, grad_weight = head_grads(hidden, weight, targets, chunk, torch.float16)
        zero_rows[chunk] = float((grad_weight == 0).all(dim=1).float().mean())
        errors[chunk] = [float((got - want).norm() / want.norm())
                         for got, want in zip((grad_hidden, grad_weight), reference, strict=True)]
    assert zero_rows == {0: 0.0, 512: 0.0}
    for chunked, whole in zip(errors[512], errors[0], strict=True):
        assert chunked <= 1.5 * whole and chunked < 1e-3  # float16's own rounding, no worse


def test_float16_chunked_head_loss_stays_finite_and_matches_unchunked_with_large_weights() -> None:
    """The headroom the stored gradient is kept with must not push g @ weight past float16's range:
    head weights far larger than training makes them (|w| up to ~40) and a loss scale of 2**16 give
    finite gradients, those of the unchunked float16 loss."""
    hidden, weight = torch.randn(512, 16), 10 * torch.randn(1000, 16)
    targets = torch.randint(0, 1000, (512,))
    expected = head_grads(hidden, weight, targets, 0, torch.float16)
    for got, want in zip(head_grads(hidden, weight, targets, 64, torch.float16), expected,
                         strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-6)


# ---- the loss scaler's state across dtypes -----------------------------------------------------


def test_a_run_saved_without_the_scaler_resumes_with_float16_from_the_initial_scale() -> None:
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # a float32 or bf16 run's
    assert saved == {}
    enabled = torch.amp.GradScaler("cpu", init_scale=LOSS_SCALE)
    with pytest.raises(RuntimeError, match="empty"):  # what loading it directly did
        enabled.load_state_dict(saved)
    load_scaler_state(enabled, saved)
    assert enabled.get_scale() == LOSS_SCALE


def test_a_float16_scaler_state_is_restored_and_ignored_by_a_disabled_scaler() -> None:
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7).state_dict()
    resumed = torch.amp.GradScaler("cpu")
    load_scaler_state(resumed, saved)
    assert resumed.get_scale() == 1024.0 and resumed.get_growth_interval() == 7
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, saved)  # a float16 run resumed in bf16: nothing to restore
    assert not disabled.is_enabled()


# ---- the device's random generator in a checkpoint ---------------------------------------------


class FakeGPUs:
    """torch.cuda's generator functions for `count` visible GPUs, each with its own state."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": self.states[self.index(device)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states.values()))

    @staticmethod
    def index(device: str | torch.device) -> int:
        return torch.device(device).index or 0  # no index: the current GPU, cuda:0 here

    def set_state(self, state: torch.Tensor, device: str | torch.device = "cuda") -> None:
        self.states[self.index(device)] = state  # a KeyError for a GPU that is not there


def test_a_checkpoint_from_a_box_with_more_gpus_restores_the_generator_of_the_gpu_in_use(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    four = FakeGPUs(monkeypatch, 4)
    assert len(torch.cuda.get_rng_state_all()) == 4  # what was saved before: one state per GPU
    saved = device_rng_state(pick_device("cuda:3"))
    torch.save(saved, tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)  # as a checkpoint is read back
    assert torch.equal(saved["state"], four.states[3])

    one = FakeGPUs(monkeypatch, 1)
    assert set_device_rng_state(pick_device("cuda"), saved)
    assert torch.equal(one.states[0], four.states[3])


def test_the_device_generator_is_left_alone_where_the_checkpoint_has_none_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = FakeGPUs(monkeypatch, 1)
    before = gpus.states[0]
    assert device_rng_state(torch.device("cpu")) is None  # the CPU's is torch.get_rng_state()'s
    assert not set_device_rng_state(torch.device("cuda"), None)  # saved by a CPU run
    assert not set_device_rng_state(torch.device("cuda"), {"type": "mps", "state": torch.zeros(4)})
    assert gpus.states[0] is before


def test_the_mps_generator_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"now": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state["now"])
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new: state.update(now=new))
    saved = device_rng_state(torch.device("mps"))
    state["now"] = torch.zeros(8, dtype=torch.uint8)
    assert set_device_rng_state(torch.device("mps"), saved)
    assert torch.equal(state["now"], torch.arange(8, dtype=torch.uint8))


# ---- failures a flag can fix, in one line ------------------------------------------------------


@pytest.mark.parametrize(("exc", "expected"), [
    (torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
        "of which 1.2 GiB is free. Including non-PyTorch memory, this process has 77.9 GiB memory "
        "in use.\nIf reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments"),
     "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower --batch-size"),
    (RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.5 GB, other allocations: 1.2 MB, max "
        "allowed: 18.1 GB). Tried to allocate 256.00 MB on private pool. Use "
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may "
        "cause system failure)."),
     "out of memory (MPS backend out of memory (MPS allocated: 17.5 GB, other allocations: 1.2 MB, "
     "max allowed: 18.1 GB). Tried to allocate 256.00 MB on private pool); lower --batch-size"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 "
                  "bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 "
     "bytes. Error code 12 (Cannot allocate memory)); lower --batch-size"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     "out of memory (CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`); "
     "lower --batch-size"),
    (BackendCompilerFailed(print, RuntimeError("Cannot find a working triton installation. Either "
                                               "the package is not installed or it is too "
                                               "old."), None),
     "--compile failed (RuntimeError: Cannot find a working triton installation. Either the "
     "package is not installed or it is too old.); run without --compile (it needs a working C++ "
     "compiler on a CPU, and Triton on a GPU)"),
    (BackendCompilerFailed(print, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 "
                                                         "GiB."),
                           None),  # out of memory while compiling (autotuning): still out of memory
     "out of memory (CUDA out of memory. Tried to allocate 1 GiB); lower --batch-size"),
])
def test_out_of_memory_and_compile_failures_become_one_line_naming_the_fix(exc: Exception,
                                                                           expected: str) -> None:
    error = user_error_for(exc, OOM_FIX)
    assert error is not None and str(error) == expected


def test_a_compiler_that_fails_inside_torch_compile_becomes_one_line() -> None:
    def broken_backend(graph, example_inputs):
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: "
                           "(None, 'g++')")

    compiled = torch.compile(lambda x: x * 2 + 1, backend=broken_backend)
    with pytest.raises(Exception) as caught:
        compiled(torch.ones(3))
    error = user_error_for(caught.value, OOM_FIX)
    assert str(error) == ("--compile failed (RuntimeError: No working C++ compiler found in "
                          "torch._inductor.config.cpp.cxx: (None, 'g++')); run without --compile "
                          "(it needs a working C++ compiler on a CPU, and Triton on a GPU)")


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("shape mismatch"),
                                 KeyError("x")])
def test_other_failures_keep_their_traceback(exc: Exception) -> None:
    assert user_error_for(exc, OOM_FIX) is None


# ---- fused AdamW -------------------------------------------------------------------------------


def test_the_optimizer_is_fused_whatever_the_device() -> None:
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.1, betas=(0.9, 0.95))
    assert optimizer.defaults["fused"] is True


def test_torch_has_fused_adamw_on_every_device_pick_device_returns() -> None:
    """torch >= 2.6 (pyproject) fuses AdamW on cpu, cuda and mps, so the trainer asks for it on
    each."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    assert {"cpu", "cuda", "mps"} <= set(_get_fused_kernels_supported_devices())
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    torch.optim.AdamW([param], lr=0.1, fused=True).step()
    assert param.detach().lt(1).all()


# ---- the GPU smoke script, on the CPU ----------------------------------------------------------


def load_smoke_script():
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_smoke_script_passes_on_the_cpu_and_fails_a_broken_export(monkeypatch, capsys) -> None:
    """Its every check runs on a tiny shape, and a broken invariant (an export whose logits are not
    ours) is a FAIL row and exit status 1, the other checks still passing."""
    smoke = load_smoke_script()
    export = smoke.export_hf

    def broken_export(model, directory):
        with torch.no_grad():
            model.final_norm.weight.mul_(1.01)
        export(model, directory)

    monkeypatch.setattr(smoke, "export_hf", broken_export)
    status = smoke.main(["--device", "cpu", "--dtypes", "float32", "--preset", "tiny",
                         "--context-length",
                         "16", "--batch-size", "2", "--steps", "4", "--loss-chunk", "8"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("cpu |")]
    assert {row[2]: row[3] for row in rows} == {"train": "PASS", "resume": "PASS",
                                                "evaluate": "PASS",
                                               "chunked": "PASS", "generate": "PASS",
                                               "export": "FAIL"}
    assert status == 1
    assert rows[1][4] == "steps 3-4 exact"  # the CPU's float32 resume is required to be exact


# ---- the trainer's wiring ----------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_setup_configures_the_device_and_never_pins_batches_for_the_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cpu on a GPU box: no pinned batches (they would initialise CUDA for nothing)."""
    configured: list[torch.device] = []
    monkeypatch.setattr(trainer, "configure_device", configured.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = trainer.setup(tiny(tmp_path, device="cpu"), token_ids=TOKENS)
    assert configured == [torch.device("cpu")]
    assert not run.train_loader.pin_memory


@pytest.mark.usefixtures("one_thread")
def test_a_float32_checkpoint_resumes_into_an_enabled_float16_scaler_at_the_initial_scale(
        tmp_path: Path) -> None:
    trainer.train(tiny(tmp_path, max_steps=2, eval_freq=2), token_ids=TOKENS)
    checkpoint = tmp_path / "run" / "last"
    saved = load_train_state(checkpoint)
    run = trainer.setup(tiny(tmp_path), resume=tmp_path / "run", token_ids=TOKENS)
    scaler = torch.amp.GradScaler("cpu", init_scale=LOSS_SCALE)  # what --dtype float16 builds
    state = restore(saved, checkpoint, optimizer=run.optimizer, scaler=scaler, sampler=run.sampler,
                    num_windows=len(run.windows), device=torch.device("cpu"))
    assert state.step == 2 and scaler.is_enabled() and scaler.get_scale() == LOSS_SCALE


def test_only_the_generator_of_the_device_in_use_is_saved_and_an_old_all_gpus_state_is_ignored(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    four = FakeGPUs(monkeypatch, 4)
    saved = rng_state(pick_device("cuda:2"))
    assert torch.equal(saved["device"]["state"], four.states[2])
    # 4 states, by index
    old = {**rng_state(torch.device("cpu")), "cuda": torch.cuda.get_rng_state_all()}
    old.pop("device")

    one = FakeGPUs(monkeypatch, 1)
    before = one.states[0]
    set_rng_state(old, torch.device("cuda"))  # raised IndexError when restored by index
    assert one.states[0] is before
    assert "dropout's random stream starts afresh" in capsys.readouterr().err
    set_rng_state(saved, torch.device("cuda"))
    assert torch.equal(one.states[0], four.states[2])
    assert capsys.readouterr().err == ""


def test_a_gpu_checkpoint_resumed_on_the_cpu_says_dropout_starts_afresh(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    FakeGPUs(monkeypatch, 1)
    set_rng_state(rng_state(torch.device("cuda")), torch.device("cpu"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it was taken on cuda" in err
    # the CPU's own: nothing to say
    set_rng_state(rng_state(torch.device("cpu")), torch.device("cpu"))
    assert capsys.readouterr().err == ""


OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total "
                             "capacity of 23.6 GiB of which 1.1 GiB is free.")


@pytest.mark.usefixtures("one_thread")
def test_out_of_memory_in_a_training_step_is_one_line_naming_the_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(run, batches):
        raise OOM

    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    with pytest.raises(UserError) as caught:
        trainer.train(tiny(tmp_path), token_ids=TOKENS)
    assert str(caught.value) == ("out of memory (CUDA out of memory. Tried to allocate 3.00 GiB); "
                                 "lower --batch-size (raising --grad-accum keeps the step's "
                                 "tokens), or set --loss-chunk, or use --dtype bfloat16")


@pytest.mark.usefixtures("one_thread")
def test_a_failed_compile_in_training_is_one_line_and_a_bug_keeps_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the compiled loss raises at its first call without Triton
    def no_triton(*args, **kwargs):
        raise BackendCompilerFailed(print, RuntimeError("Cannot find a working triton "
                                                        "installation."), None)

    monkeypatch.setattr(torch, "compile", lambda fn: no_triton)
    with pytest.raises(UserError, match=r"^--compile failed \(RuntimeError: Cannot find a working "
                                        r"triton installation.\); run without --compile"):
        trainer.train(tiny(tmp_path, compile=True), token_ids=TOKENS)

    monkeypatch.setattr(trainer, "build_model", lambda cfg: {}["a bug in setup"])
    with pytest.raises(KeyError):
        trainer.train(tiny(tmp_path, run_name="other"), token_ids=TOKENS)


def float16_run(tmp_path: Path, init_scale: float) -> trainer.Run:
    """A tiny run under CPU float16 autocast with an enabled loss scaler (train.py allows float16 on
    CUDA only; the CPU runs the same code)."""
    run = trainer.setup(tiny(tmp_path), token_ids=TOKENS)
    run.dtype, run.scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=init_scale)
    return run


def overflow_gradients(run: trainer.Run) -> None:
    """Make the next backward pass's gradient infinite (a finite loss), as a float16 overflow does.
    """
    def hook(module, inputs, hidden):
        handle.remove()
        hidden.register_hook(lambda grad: grad * math.inf)

    handle = run.model.final_norm.register_forward_hook(hook)


@pytest.mark.usefixtures("one_thread")
def test_a_float16_overflow_skips_the_step_says_so_and_training_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = float16_run(tmp_path, init_scale=1024.0)
    batches = iter(trainer.micro_batch_groups(run.train_loader, 1))
    first = trainer.train_step(run, next(batches))
    assert math.isfinite(first.grad_norm) and run.scaler.get_scale() == 1024.0
    before = params(run.model)
    overflow_gradients(run)
    skipped = trainer.train_step(run, next(batches))
    assert not math.isfinite(skipped.grad_norm) and math.isfinite(skipped.loss)
    assert_same_params(params(run.model), before)  # the scaler skipped the update
    assert run.state.step == 2 and run.scaler.get_scale() == 512.0
    third = trainer.train_step(run, next(batches))
    assert math.isfinite(third.grad_norm)
    assert capsys.readouterr().out.splitlines() == ["step 2 skipped (float16 overflow, loss scale "
                                                    "now 512)"]


@pytest.mark.usefixtures("one_thread")
def test_a_collapsed_float16_loss_scale_stops_training_with_the_fix(tmp_path: Path) -> None:
    run = float16_run(tmp_path, init_scale=1.0)
    overflow_gradients(run)
    with pytest.raises(TrainingDiverged, match=r"loss scale fell to 0.5 \(step 1\); use --dtype "
                                               r"bfloat16 or float32, or lower --lr$"):
        trainer.train_step(run, next(trainer.micro_batch_groups(run.train_loader, 1)))
