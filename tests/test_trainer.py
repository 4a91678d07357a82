import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import STEPS_PER_EPOCH, TOKENS, assert_same_params, params, pattern_tokens, tiny

import gpt.base.atomic
import gpt.checkpoints.checkpoint
from gpt.checkpoints.checkpoint import load_checkpoint, load_train_state
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.objectives.lm import CrossEntropy, LanguageModeling, training_loss
from gpt.training import trainer
from gpt.training.metrics import METRICS_COLUMNS
from gpt.training.settings import TrainConfig
from gpt.training.trainer import TrainingDiverged, fit, setup, train

GOLDEN = Path(__file__).parent / "golden" / "tiny_fp32_losses.json"
# float32 rounding across CPU vendors; a real change moves a loss by far more. Measured: the file
# (made on an Intel Xeon) against an AVX-512 AMD EPYC, AVX2-pinned or not: at most 2 ulps (1.25e-7).
GOLDEN_RTOL = 1e-6
REGENERATE = "GPT_REGEN_GOLDEN=1 python -m pytest tests/test_trainer.py -k golden"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the golden losses ------------------------------------------------------------------------


def golden_run(tmp_path: Path) -> list[float]:
    """The first 20 step losses of a fixed tiny run on the explicit float32 CPU path, one thread.

    Pinned: every setting (see `tiny`), dtype float32 (not auto, which may pick bf16), the
    full-logits loss of `lm_loss` (what `train_step` computes today; a faster loss path must keep
    this one).
    """
    torch.set_num_threads(1)  # a matmul's summation order may depend on the thread count
    cfg = tiny(tmp_path, context_length=32, max_steps=20, eval_freq=20, eval_iters=1, seed=7)
    result = train(cfg, token_ids=(pattern_tokens(1000), pattern_tokens(100, offset=3000)))
    return [result.step_losses[step] for step in range(1, 21)]


def golden_losses(tmp_path: Path) -> list[float]:
    """`golden_run` in a fresh process whose ATen kernels are pinned to AVX2.

    PyTorch picks its vectorised CPU kernels by the widest instruction set the CPU has, and a
    reduction summed in 16-float lanes (AVX-512) rounds differently from one in 8-float lanes
    (AVX2): the same run's losses then differ in the last bit. ATEN_CPU_CAPABILITY, read when torch
    is imported, pins the lane width (made on an AVX2-only EPYC, reproduced bit for bit on an
    AVX-512 one). It does not pin the BLAS library's own kernels, which differ by CPU vendor: an
    Intel Xeon gives the same run with a few losses one or two float32 ulps away, so
    `test_golden_losses` compares to GOLDEN_RTOL, far below what any change to the model, data or
    loop moves them by.
    """
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from test_trainer import golden_run; print(json.dumps(golden_run(Path(sys.argv[2]))))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_golden_losses(tmp_path) -> None:
    losses = golden_losses(tmp_path)
    if os.environ.get("GPT_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"regenerate": REGENERATE, "torch": torch.__version__,
                                      "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(golden["losses"], rel=GOLDEN_RTOL, abs=0), (
        f"the training losses changed (golden file made with torch {golden['torch']}); if that is "
        f"intended, regenerate with: {REGENERATE}")
    assert losses[-1] < losses[0] - 1.0  # and they describe a model that learns


# ---- gradient accumulation ---------------------------------------------------------------


def test_grad_accumulation_matches_one_big_batch(tmp_path) -> None:
    big = setup(tiny(tmp_path, drop_rate=0.0, batch_size=4, run_name="big"), token_ids=TOKENS)
    small = setup(tiny(tmp_path, drop_rate=0.0, batch_size=2, grad_accum=2, run_name="small"),
                  token_ids=TOKENS)
    for run in (big, small):
        run.optimizer.step = lambda *args, **kwargs: None  # keep the gradients to compare them
    x, y = next(iter(big.train_loader))  # any 4 windows
    big_stats = trainer.train_step(big, [(x, y)])
    small_stats = trainer.train_step(small, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert small_stats.loss == pytest.approx(big_stats.loss, rel=1e-6)
    assert small_stats.grad_norm == pytest.approx(big_stats.grad_norm, rel=1e-5)
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


# ---- early stopping ---------------------------------------------------------------------------


def scripted_evaluation(monkeypatch, losses) -> None:
    """The cross-entropy objective's evaluations replaced by `losses(run)` = (train, validation)."""
    def evaluate(self, run) -> dict[str, float]:
        train_loss, val_loss = losses(run)
        return {"train_loss": train_loss, "val_loss": val_loss,
                "val_perplexity": math.exp(val_loss)}

    monkeypatch.setattr(LanguageModeling, "evaluate", evaluate)


@pytest.mark.parametrize(("val_losses", "min_delta", "best_step", "last_step"), [
    ([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0], 0.0, 4, 10),
    ([5.0, 4.9, 4.8, 4.76, 1.0], 0.25, 0, 6),  # improvements below min_delta do not count
])
def test_early_stopping_keeps_the_best_weights(tmp_path, monkeypatch, capsys, val_losses, min_delta,
                                               best_step, last_step) -> None:
    snapshots = {}
    scripted = iter(val_losses)

    def fake_estimate(run):
        snapshots[run.state.step] = params(run.model)
        return 1.0, next(scripted)

    scripted_evaluation(monkeypatch, fake_estimate)
    result = train(tiny(tmp_path, eval_freq=2, patience=3, min_delta=min_delta), token_ids=TOKENS)
    assert (result.stop_reason, result.step, result.best_step) == ("early_stop", last_step,
                                                                   best_step)
    assert sorted(snapshots) == list(range(0, last_step + 1, 2))
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "best")), snapshots[best_step])
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "last")), snapshots[last_step])
    assert load_train_state(tmp_path / "run" / "best")["state"]["step"] == best_step
    out = capsys.readouterr().out
    assert f"best validation loss {val_losses[best_step // 2]:.4f}" in out and f"at step {best_step}" in out  # noqa: E501


def test_patience_zero_never_stops_early(tmp_path, monkeypatch) -> None:
    scripted_evaluation(monkeypatch, lambda run: (1.0, 1.0))  # a flat line
    # 3 flat evals
    result = train(tiny(tmp_path, epochs=1, eval_freq=5, patience=0), token_ids=TOKENS)
    assert (result.stop_reason, result.step) == ("done", STEPS_PER_EPOCH)


# ---- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_non_finite_stops_before_the_update(tmp_path, what: str) -> None:
    run = setup(tiny(tmp_path, eval_freq=2), token_ids=TOKENS)
    bad_step, seen, before = 5, [], {}

    def poison(module, inputs, hidden):  # on the final LayerNorm: what the LM head reads
        if not module.training:  # evaluation passes
            return None
        seen.append(1)
        if len(seen) != bad_step:
            return None
        before.update(params(run.model))
        before["adam steps"] = torch.tensor([s["step"] for s in run.optimizer.state.values()])
        if what == "loss":
            return hidden * math.nan
        hidden.register_hook(lambda grad: grad * math.inf)  # a finite loss, an infinite gradient
        return None

    run.model.final_norm.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=f"the {what} is (nan|inf) at step {bad_step}:"):
        fit(run)
    assert run.state.step == bad_step - 1
    after = params(run.model)
    after["adam steps"] = torch.tensor([s["step"] for s in run.optimizer.state.values()])
    assert_same_params(after, before)
    # the last evaluation's
    assert load_train_state(tmp_path / "run" / "last")["state"]["step"] == 4


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    cfg = tiny(tmp_path, epochs=1, eval_freq=4)
    run = setup(cfg, token_ids=TOKENS)
    original_fit_total = run.total_steps
    run.total_steps = 4
    fit(run)  # last/ at step 4
    run.total_steps = original_fit_total
    trainer.train_step(run, [next(iter(run.train_loader))])  # the model moves on to step 5
    step4 = params(load_checkpoint(tmp_path / "run" / "last"))

    def half_written(obj, path):  # killed while writing train_state.pt
        Path(path).write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt.checkpoints.checkpoint.torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoints(run, last=True, best=False)
        run.saver.wait()  # a background save's error is raised here
    monkeypatch.undo()
    assert load_train_state(tmp_path / "run" / "last")["state"]["step"] == 4
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "last")), step4)

    renames = []

    def rename_then_die(src, dst):  # killed between "last -> .last.old" and ".last.tmp -> last"
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.replace(src, dst)

    monkeypatch.setattr(gpt.base.atomic.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoints(run, last=True, best=False)
        run.saver.wait()
    monkeypatch.undo()
    assert not (tmp_path / "run" / "last").exists()
    resumed = setup(cfg, resume=tmp_path / "run", token_ids=TOKENS)  # reads .last.old
    assert resumed.state.step == 4
    assert_same_params(params(resumed.model), step4)


KILLER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from gpt.checkpoints.checkpoint import save_checkpoint
    from gpt.model.config import GPTConfig
    from gpt.model.model import GPT

    model = GPT(GPTConfig.preset("tiny"))
    print("ready", flush=True)
    for step in range(1, 10**6):
        with torch.no_grad():
            model.tok_emb.weight.fill_(step)
        save_checkpoint(model, {"state": {"step": step}}, Path(sys.argv[1]))
""")


def test_a_killed_process_leaves_a_whole_checkpoint(tmp_path) -> None:
    """SIGKILL (no cleanup at all) at arbitrary moments of a save loop: what is left loads, whole.
    """
    target = tmp_path / "last"
    for delay in (0.5,):
        child = subprocess.Popen([sys.executable, "-c", KILLER, str(target)],
                                 stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.kill()
        child.wait()
        state = load_train_state(target)
        model = load_checkpoint(target)
        assert state["state"]["step"] >= 1
        assert torch.all(model.tok_emb.weight == state["state"]["step"])  # weights and state agree


def test_run_directory_files(tmp_path) -> None:
    result = train(tiny(tmp_path, epochs=1, eval_freq=5, sample_tokens=3), token_ids=TOKENS)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "best", "last", "loss.png", "metrics.csv", "train_config.json"]
    for checkpoint in ("best", "last"):
        assert sorted(p.name for p in (run_dir / checkpoint).iterdir()) == [
            "config.json", "model.safetensors", "train_state.pt"]
    config = json.loads((run_dir / "train_config.json").read_text())
    assert TrainConfig.from_dict(config) == tiny(tmp_path, epochs=1, eval_freq=5, sample_tokens=3)
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRICS_COLUMNS)
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 5, 10, 11]  # and the last step
    state = load_train_state(run_dir / "last")
    assert state["state"]["step"] == result.step == STEPS_PER_EPOCH
    assert state["state"]["tokens_seen"] == STEPS_PER_EPOCH * 2 * 16
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


# ---- speed options do not change what is learned ----------------------------------------------


def test_chunked_loss_trains_like_the_full_loss(tmp_path) -> None:
    """--loss-chunk computes the same loss and gradients in pieces: float32 runs agree to rounding.
    """
    runs = {}
    for chunk in (0, 5):
        cfg = tiny(tmp_path, loss_chunk=chunk, max_steps=8, eval_freq=8, run_name=f"chunk{chunk}")
        with torch.random.fork_rng():
            result = train(cfg, token_ids=TOKENS)
            runs[chunk] = (result, load_checkpoint(tmp_path / f"chunk{chunk}" / "last"))
    full, chunked = runs[0], runs[5]
    assert list(full[0].step_losses) == list(chunked[0].step_losses) == list(range(1, 9))
    for step, loss in full[0].step_losses.items():
        assert chunked[0].step_losses[step] == pytest.approx(loss, rel=1e-5)
    for (name, a), b in zip(full[1].state_dict().items(), chunked[1].state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ---- --init: starting from GPT-2 weights --------------------------------------------------------


def test_init_from_a_hugging_face_directory_starts_from_its_weights(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = tiny(tmp_path, init=str(tmp_path / "hf"), drop_rate=0.0, max_steps=3, eval_freq=3)
    run = setup(cfg, token_ids=TOKENS)
    assert run.model.config.emb_dim == 16 and run.model.config.qkv_bias  # GPT-2's shape, not tiny's
    idx = torch.tensor(TOKENS[0][:16].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    run.model.train()
    result = fit(run)
    assert result.step == 3 and math.isfinite(result.best_val_loss)
    assert load_checkpoint(tmp_path / "run" / "last").config == run.model.config


def test_compiled_training_loss_compiles_the_transformer_and_matches_the_eager_loss_and_gradients() -> None:  # noqa: E501
    model = GPT(GPTConfig.preset("tiny", vocab_size=300, drop_rate=0.0))
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    y[0, :5] = -100
    for chunk in (0, 7):
        eager = model.loss(x, y, chunk_size=chunk)
        (eager_grad,) = torch.autograd.grad(eager, model.blocks[0].attn.qkv.weight)
        compiled = training_loss(CrossEntropy(), model, None, compile=True)(x, y, chunk_size=chunk)
        (compiled_grad,) = torch.autograd.grad(compiled, model.blocks[0].attn.qkv.weight)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
