"""Checkpoints written in the background (`gpt.checkpoints.saver`) and less often (`save_freq`): the
same files, an exact resume, and the previous checkpoint whole after a failed or killed write."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_runs import TOKENS, assert_same_params, params, tiny

import gpt.checkpoints.checkpoint
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import load_checkpoint, load_train_state
from gpt.checkpoints.saver import CheckpointSaver
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training import trainer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import setup, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_background_save_writes_the_state_at_the_step_not_later_changes(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny", tie_embeddings=False))
    moment = torch.ones(3)
    before = params(model)
    with CheckpointSaver(background=True) as saver:
        saver.save(model, {"optimizer": {"exp_avg": moment}, "step": 4},
                   [tmp_path / "last", tmp_path / "best"])
        with torch.no_grad():  # training goes on while the thread writes
            for p in model.parameters():
                p.add_(1.0)
            moment.add_(1.0)
    for name in ("last", "best"):
        assert_same_params(params(load_checkpoint(tmp_path / name)), before)
        state = load_train_state(tmp_path / name)
        assert torch.equal(state["optimizer"]["exp_avg"], torch.ones(3)) and state["step"] == 4


def stop_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash (an exception, not Ctrl-C: nothing is saved on the way out) right after step `step`."""
    original = trainer.train_step

    def step_then_crash(run, batches):
        stats = original(run, batches)
        if run.state.step == step:
            raise RuntimeError("crash")
        return stats

    monkeypatch.setattr(trainer, "train_step", step_then_crash)


def save_freq_run(tmp_path, **overrides) -> TrainConfig:
    # Evaluations every 2 steps, last/ at every 3rd (steps 0, 6, 12, ...) and at the end (22).
    return tiny(tmp_path, **{"epochs": 2, "eval_freq": 2, "save_freq": 3, **overrides})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, one_thread) -> tuple[Path, trainer.TrainResult]:
    """The run saved at every evaluation, in the foreground, that never stops (made once, read
    only)."""
    out = tmp_path_factory.mktemp("straight")
    with torch.random.fork_rng():
        result = train(save_freq_run(out, async_save=False, save_freq=1, run_name="straight"),
                       token_ids=TOKENS)
    return out / "straight", result


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_continues_exactly_with_save_freq_and_async_saves(tmp_path, monkeypatch,
                                                                 straight_run,
                                                                 async_save: bool) -> None:
    cfg = save_freq_run(tmp_path, async_save=async_save, run_name="run")
    straight_dir, straight = straight_run
    stop_after(10, monkeypatch)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, token_ids=TOKENS)
    monkeypatch.undo()
    assert load_train_state(tmp_path / "run" / "last")["state"]["step"] == 6  # not 8 or 10: skipped
    # best/ is saved at every improvement, skipped or not: the resumed run starts from the newer
    assert load_train_state(tmp_path / "run" / "best")["state"]["step"] == 8

    torch.manual_seed(999)
    resumed = train(cfg, resume=tmp_path / "run", token_ids=TOKENS)
    assert resumed.step_losses == {s: v for s, v in straight.step_losses.items() if s > 8}
    assert load_train_state(tmp_path / "run" / "last")["state"]["step"] == straight.step
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "last")),
                       params(load_checkpoint(straight_dir / "last")))
    resumed_csv, straight_csv = ([line.split(",")[:6] for line in (run_dir / "metrics.csv")
                                  .read_text().splitlines()] for run_dir in (tmp_path / "run",
                                                                             straight_dir))
    assert resumed_csv == straight_csv  # each evaluation once, as the straight run logged it


def test_an_error_in_the_writer_thread_keeps_the_previous_checkpoint_and_is_raised(tmp_path,
                                                                                    monkeypatch) -> None:  # noqa: E501
    run = setup(tiny(tmp_path, epochs=1, async_save=True), token_ids=TOKENS)
    trainer.save_checkpoints(run, last=True, best=False)
    run.saver.wait()
    step0 = params(run.model)
    trainer.train_step(run, [next(iter(run.train_loader))])

    def half_written(obj, path):
        path.write_bytes(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpt.checkpoints.checkpoint.torch, "save", half_written)
    trainer.save_checkpoints(run, last=True, best=False)  # returns: the thread fails later
    with pytest.raises(UserError, match="No space left"):  # gpt.base.atomic's one line naming last/
        run.saver.wait()
    run.saver.wait()  # the error is raised once
    assert load_train_state(tmp_path / "run" / "last")["state"]["step"] == 0
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "last")), step0)
    hidden = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("."))
    assert hidden == [".lock"]  # the run's lock (gpt.training.run_dir), and no temporary


KILLED_MID_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import gpt.checkpoints.checkpoint
    from gpt.model.config import GPTConfig
    from gpt.model.model import GPT
    from gpt.checkpoints.saver import CheckpointSaver

    target = Path(sys.argv[1])
    model = GPT(GPTConfig.preset("tiny", tie_embeddings=False))
    saver = CheckpointSaver(background=True)
    with torch.no_grad():
        model.tok_emb.weight.fill_(1)
    saver.save(model, {"state": {"step": 1}}, [target])
    saver.wait()
    real_save = torch.save

    def slow_save(obj, path):  # the second save stops half-way through train_state.pt
        Path(path).write_bytes(b"PK half")
        print("writing", flush=True)
        time.sleep(60)

    gpt.checkpoints.checkpoint.torch.save = slow_save
    with torch.no_grad():
        model.tok_emb.weight.fill_(2)
    saver.save(model, {"state": {"step": 2}}, [target])
    time.sleep(60)  # training would go on here
""")


def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_whole(tmp_path) -> None:
    target = tmp_path / "last"
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(target)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"writing\n"
    finally:
        child.kill()  # SIGKILL: no cleanup of any kind
        child.wait()
    assert load_train_state(target)["state"]["step"] == 1
    assert torch.all(load_checkpoint(target).tok_emb.weight == 1)
