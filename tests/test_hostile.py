"""What a hostile user broke (issue 30, item 3), each now impossible or one `error:` line (exit 2)
that names the problem and the fix, with every file left as it was (compared by hash).

Tests run as root, which every permission check lets through: a permission denied is simulated by
monkeypatching the call that would meet it to raise `PermissionError`, as a non-root user would.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tiny_runs import TOKENS, assert_same_params, params, tiny
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import gpt.checkpoints.saver
from gpt.base.errors import UserError, run_cli
from gpt.checkpoints.checkpoint import load_checkpoint, load_train_state
from gpt.checkpoints.weights import save_hf
from gpt.cli.export import main as export_main
from gpt.cli.generate import main as generate_main
from gpt.cli.train import main as train_main
from gpt.data.pairs import load_pairs
from gpt.eval.evaluate import main as evaluate_main
from gpt.eval.explain import main as explain_main
from gpt.training.trainer import TrainResult, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(emb_dim=16, n_heads=2, max_steps=6, eval_freq=2)  # small checkpoints, fast saves


def small(tmp_path: Path, **overrides) -> object:
    return tiny(tmp_path, **{**SMALL, **overrides})


def hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` by its relative path, as a sha256 of its bytes; a run's `.lock`
    is left out (it holds the process id of whoever locked the run last)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python ARGS` run from `cwd` with the repository importable, one thread, no GPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The `error: ...` line of a refused command: exit 2, no traceback, one line on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def error_line(main, argv: list[str], capsys) -> str:
    """The `error: ...` line of a command's `main(argv)` run in this process as its console script
    runs it (`run_cli`): exit status 2, one line on stderr after progress bars, if any, and no
    traceback. Cheaper than `command` (no new interpreter)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1 and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def best_step_of(checkpoint: Path) -> int:
    return load_train_state(checkpoint)["state"]["step"]


# ---- last/ and best/ always agree ---------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread) -> tuple[Path, TrainResult]:
    """A 6-step run that nothing interrupts (made once, read only), to compare resumed runs with."""
    out = tmp_path_factory.mktemp("straight")
    return out / "run", train(small(out), token_ids=TOKENS)


def _killed_while_saving(cfg, name: str, step: int) -> None:
    """Train `cfg`, SIGKILLed as it starts writing `name` (last or best) at `step`."""
    write = gpt.checkpoints.saver.write_checkpoint

    def write_or_die(tensors, config, train_state, directory):
        if directory.name == name and train_state["state"]["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        write(tensors, config, train_state, directory)

    gpt.checkpoints.saver.write_checkpoint = write_or_die
    train(cfg, token_ids=TOKENS)


def killed_between_writes(cfg, step: int) -> None:
    """Run `cfg` in a forked child killed (SIGKILL) after best/, before last/, at `step`."""
    child = multiprocessing.get_context("fork").Process(target=_killed_while_saving,
                                                        args=(cfg, "last", step))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize(("step", "async_save"), [(4, True), (4, False), (0, True)])
def test_a_kill_between_the_best_and_last_writes_resumes_from_best_as_if_never_stopped(
        tmp_path, capsys, straight, step, async_save) -> None:
    """Killed after best/, before last/, at step 4 (last/ still at step 2) or at the first save (no
    last/ yet): the run resumes from best/, the newest checkpoint, and ends as the straight run."""
    straight_dir, straight_result = straight
    # every evaluation improves: best/ is written at step 4 too
    assert straight_result.best_step == 6
    cfg = small(tmp_path, async_save=async_save)
    killed_between_writes(cfg, step=step)
    run_dir = tmp_path / "run"
    assert best_step_of(run_dir / "best") == step
    if step:
        assert best_step_of(run_dir / "last") == step - 2
    else:
        assert not (run_dir / "last").exists()
    resumed = train(cfg, resume=run_dir, token_ids=TOKENS)
    out = capsys.readouterr().out
    if step:
        assert (f"note: {run_dir / 'last'} names step 2 (validation loss" in out
                and f"as the best, but {run_dir / 'best'} holds step 4" in out
                and f"resuming from {run_dir / 'best'}, the newest checkpoint of the run" in out)
    assert resumed.step_losses == {s: loss for s, loss in straight_result.step_losses.items()
                                   if s > step}
    assert (resumed.best_step, resumed.best_val_loss) == (straight_result.best_step,
                                                          straight_result.best_val_loss)
    assert f"at step {resumed.best_step}: weights in {run_dir / 'best'}" in out
    assert best_step_of(run_dir / "best") == resumed.best_step
    for name in ("best", "last"):
        assert_same_params(params(load_checkpoint(run_dir / name)),
                           params(load_checkpoint(straight_dir / name)))


def test_best_is_saved_before_last_so_a_full_disk_at_the_first_best_leaves_no_checkpoint(
        tmp_path, monkeypatch) -> None:
    """A write of best/ that fails (ENOSPC) at the first evaluation: last/ is not written after it,
    so no checkpoint names a best that is not on disk, and --resume starts again from step 0."""
    write = gpt.checkpoints.saver.write_checkpoint

    def full_at_best(tensors, config, train_state, directory):
        if directory.name == "best":
            raise OSError(28, "No space left on device")
        write(tensors, config, train_state, directory)

    monkeypatch.setattr(gpt.checkpoints.saver, "write_checkpoint", full_at_best)
    with pytest.raises(OSError, match="No space left"):
        train(small(tmp_path, async_save=False), token_ids=TOKENS)
    assert not (tmp_path / "run" / "last").exists()


@pytest.mark.parametrize("best", ["older", "missing"])
def test_a_last_checkpoint_that_is_the_best_replaces_a_best_that_is_older_or_missing(
        tmp_path, capsys, straight, best) -> None:
    """What a run saved by an earlier version (last/ first) left after a kill or a full disk between
    its two writes: last/ at step 4, the best, and best/ still at step 2, or none. The resumed run
    makes best/ a copy of last/ and then names it truthfully."""
    straight_result = straight[1]
    cfg = small(tmp_path, max_steps=4)
    early = train(small(tmp_path, max_steps=2, run_name="early"), token_ids=TOKENS)
    train(cfg, token_ids=TOKENS)
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "best")
    if best == "older":
        shutil.copytree(early.run_dir / "best", run_dir / "best")
    capsys.readouterr()
    resumed = train(small(tmp_path), resume=run_dir, token_ids=TOKENS)
    out = capsys.readouterr().out
    assert f"note: {run_dir / 'last'} names step 4" in out
    assert f"{run_dir / 'best'} is now a copy of {run_dir / 'last'}, the best" in out
    assert resumed.step_losses == {s: straight_result.step_losses[s] for s in (5, 6)}
    assert best_step_of(run_dir / "best") == resumed.best_step == straight_result.best_step


def test_resuming_last_by_name_with_a_newer_best_counts_best_as_the_best_so_far(tmp_path,
                                                                                capsys) -> None:
    """--resume RUN/last when best/ is newer (killed between the writes): last/ is resumed, as
    asked, and the best it names is best/'s, which is on disk; best/ is not rewritten."""
    cfg = small(tmp_path)
    killed_between_writes(cfg, step=4)
    run_dir = tmp_path / "run"
    best_before = hashes(run_dir / "best")
    run = setup(cfg, resume=run_dir / "last", token_ids=TOKENS)
    run.lock.release()
    assert "the resumed run counts" in capsys.readouterr().out
    best_state = load_train_state(run_dir / "best")["state"]
    assert (run.state.step, run.state.best_step, run.state.best_val_loss) == (
        2, 4, best_state["best_val_loss"])
    assert hashes(run_dir / "best") == best_before


def test_a_damaged_best_checkpoint_on_resume_is_one_line_and_changes_nothing(tmp_path,
                                                                             straight) -> None:
    run_dir = Path(shutil.copytree(straight[0], tmp_path / "runs" / "run"))
    (run_dir / "best" / "train_state.pt").write_bytes(b"garbage")
    before = hashes(run_dir)
    line = one_error_line(command([str(ROOT / "train.py"), "--resume", str(run_dir)], tmp_path))
    assert line.startswith(f"error: cannot read {run_dir / 'best' / 'train_state.pt'} safely")
    assert line.endswith(f"move {run_dir / 'best'} aside and resume again (the run saves a new "
                         f"best/ "
                         "at its next improvement)")
    assert hashes(run_dir) == before


# ---- a damaged training state is refused before anything is written ------------------------------


def train_flags(tmp_path: Path, *more: str) -> list[str]:
    """train.py's flags for a tiny 2-step run on a small corpus in `tmp_path`, in runs/run."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(" ".join(f"token{i % 37} and so on." for i in range(400)))
    return ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--preset", "tiny",
            "--emb-dim",
            "16", "--n-heads", "2", "--context-length", "16", "--batch-size", "2", "--eval-iters",
            "1",
            "--dtype", "float32", "--device", "cpu", "--sample-tokens", "0", "--max-steps", "2",
            "--eval-freq", "2", "--out", str(tmp_path / "runs"), "--run-name", "run", *more]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A run that train.py made (its corpus beside runs/), made once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("cli")
    train_main(train_flags(out))
    return out


def copied_run(cli_run: Path, tmp_path: Path) -> Path:
    """A copy of `cli_run`'s directory (corpus, token cache, runs/run) under `tmp_path`; its run."""
    for name in ("corpus.txt", "data", "runs"):
        source = cli_run / name
        shutil.copytree(source, tmp_path / name) if source.is_dir() else shutil.copy(source,
                                                                                     tmp_path)
    return tmp_path / "runs" / "run"


def damage_state(checkpoint: Path, change) -> None:
    """Rewrite `checkpoint`'s train_state.pt with `change(state)` applied (a readable file)."""
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    change(state)
    torch.save(state, checkpoint / "train_state.pt")


def put(path: str, value):
    """A change to a train state: set the entry at `path` ("state.step") to `value`."""
    def change(state: dict) -> None:
        *parents, key = path.split(".")
        for parent in parents:  # a digit indexes a list (optimizer.param_groups.0.eps)
            state = state[int(parent)] if isinstance(state, list) else state[parent]
        state[key] = value
    return change


@pytest.mark.parametrize(("path", "value", "message"), [
    ("state.step", -7, "state 'step' is -7, not an integer in [0, ...]"),
    ("state.tokens_seen", -1, "state 'tokens_seen' is -1"),
    ("state.best_step", 99, "state 'best_step' is 99, not an integer in [0, 2]"),
    ("state.evals_since_best", -2, "state 'evals_since_best' is -2"),
    ("state.best_val_loss", float("nan"), "state 'best_val_loss' is nan, not a loss"),
    ("state.best_val_loss", float("-inf"), "state 'best_val_loss' is -inf, not a loss"),
    ("sampler.position", -5, "sampler 'position' is -5"),
    ("sampler.position", 10**12, "sampler 'position' is 1000000000000"),
    ("sampler.seed", 2**40, "sampler 'seed' is 1099511627776"),
    ("sampler.epoch", -1, "sampler 'epoch' is -1"),
    ("num_windows", 0, "'num_windows' is 0"),
    ("world_size", "2", "'world_size' is '2'"),
    ("train_config.seed", 2**32, "its settings: --seed must be in [0, 2^32), got 4294967296"),
    ("train_config.lr", None, "its settings: --lr must be float, got None"),
    ("train_config.mask_prompt", "no", "its settings: --mask-prompt must be bool, got 'no'"),
    ("optimizer.param_groups.0.eps", 0.0, "optimizer param group 0 has an lr, eps, weight_decay "
                                          "or betas out of range"),
    ("optimizer.param_groups.1.weight_decay", -5.0, "optimizer param group 1 has an lr, eps"),
    ("optimizer.param_groups.0.betas", (0.9, 1.5), "optimizer param group 0 has an lr, eps"),
    ("optimizer.param_groups.0.lr", float("nan"), "optimizer param group 0 has an lr, eps"),
    ("scaler.scale", float("nan"), "scaler 'scale' is nan, not a positive number"),
])
def test_a_resumed_state_out_of_range_is_one_line_and_changes_nothing(tmp_path, capsys, cli_run,
                                                                      path,
                                                                      value, message) -> None:
    """In this process (`error_line`), but for the first case, run as `python train.py`."""
    run_dir = copied_run(cli_run, tmp_path)
    for checkpoint in ("last", "best"):  # best/ is read too (`settle_best`)
        damage_state(run_dir / checkpoint, put(path, value))
    before = hashes(tmp_path)
    argv = ["--resume", str(run_dir)]
    line = one_error_line(command([str(ROOT / "train.py"), *argv],
                                  tmp_path)) if path == "state.step" \
        else error_line(train_main, argv, capsys)
    assert line.startswith(f"error: {run_dir / 'last' / 'train_state.pt'} is not a complete "
                           f"training state ({message}")
    assert line.endswith("; resume from another checkpoint (best/) or start a new run")
    assert hashes(tmp_path) == before


def test_a_data_position_inside_a_batch_is_one_line_and_changes_nothing(tmp_path, capsys,
                                                                        cli_run) -> None:
    """Within the epoch but not where a batch starts: the data order would be shifted by one window.
    """
    run_dir = copied_run(cli_run, tmp_path)
    damage_state(run_dir / "last", put("sampler.position", 3))
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir)], capsys)
    assert line == (f"error: {run_dir / 'last' / 'train_state.pt'}: its data-loader position 3 is "
                    f"not the "
                    "start of a batch of this run's data order (a damaged file); resume from "
                    "another checkpoint (best/) or start a new run")
    assert hashes(tmp_path) == before


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tie_embeddings", "no", "GPTConfig.tie_embeddings must be true or false, got 'no'"),
    ("qkv_bias", 1, "GPTConfig.qkv_bias must be true or false, got 1"),
    ("drop_rate", None, "GPTConfig.drop_rate must be a finite number, got None"),
    ("layer_norm_eps", "1e-5", "GPTConfig.layer_norm_eps must be a finite number, got '1e-5'"),
    ("emb_dim", "16", "GPTConfig.emb_dim must be a positive integer, got '16'"),
    ("emb_dim", 10**9, "GPTConfig describes a model of about 2.4e+19 parameters (9.6e+07 TB"),
])
def test_a_resumed_model_config_of_the_wrong_type_is_one_line_and_changes_nothing(
        tmp_path, capsys, cli_run, field, value, message) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    config = run_dir / "last" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    before = hashes(tmp_path)
    argv = ["--resume", str(run_dir)]
    line = one_error_line(command([str(ROOT / "train.py"), *argv],
                                  tmp_path)) if field == "tie_embeddings" \
        else error_line(train_main, argv, capsys)
    assert line.startswith(f"error: {config} is not a valid model config: {message}")
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_a_seed_outside_what_numpy_takes_is_one_line_and_writes_nothing(tmp_path, capsys,
                                                                        seed) -> None:
    argv = train_flags(tmp_path, "--seed", seed)
    line = one_error_line(command([str(ROOT / "train.py"), *argv], tmp_path)) if seed == "-1" \
        else error_line(train_main, argv, capsys)
    assert line == f"error: --seed must be in [0, 2^32), got {int(seed)}; e.g. --seed 123"
    assert not (tmp_path / "runs").exists()


def test_a_seed_outside_the_range_in_a_runs_settings_file_is_one_line(tmp_path, capsys) -> None:
    """A run directory with its settings but no checkpoint yet: --resume reads train_config.json."""
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "train_config.json").write_text(json.dumps({"seed": 2**32}))
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir)], capsys)
    assert line == (f"error: {run_dir / 'train_config.json'} does not hold a run's settings (its "
                    f"settings: "
                    "--seed must be in [0, 2^32), got 4294967296; e.g. --seed 123); start a new "
                    "run")
    assert hashes(tmp_path) == before


# ---- tracebacks that are now one line ------------------------------------------------------------


def test_a_generate_seed_past_what_torch_takes_is_one_line(tmp_path, capsys, cli_run) -> None:
    run_dir = cli_run / "runs" / "run"
    for seed in (2**63, 2**64, -1):
        argv = ["--checkpoint", str(run_dir), "--seed", str(seed), "--max-new-tokens", "2"]
        line = one_error_line(command([str(ROOT / "generate.py"), *argv],
                                      tmp_path)) if seed == 2**64 \
            else error_line(generate_main, argv, capsys)
        assert line == f"error: --seed must be an integer in [0, 2^63), got {seed}; e.g. --seed 123"


def nested(depth: int) -> str:
    return '{"question": ' + "[" * depth + "]" * depth + ', "answer": "x"}'


JSON_BOMBS = {"nested 200,000 deep": (nested(200_000), "JSON nested deeper than Python can read"),
              "a 5,000-digit integer": ('{"question": ' + "7" * 5000 + ', "answer": "x"}',
                                        "an integer of more digits than Python converts")}


@pytest.mark.parametrize("bomb", JSON_BOMBS)
def test_a_records_line_too_deep_or_too_long_a_number_is_one_line(tmp_path, capsys, bomb) -> None:
    line_text, found = JSON_BOMBS[bomb]
    records = tmp_path / "qa.jsonl"
    records.write_text('{"question": "Q?", "answer": "A."}\n' + line_text + "\n")
    argv = train_flags(tmp_path)
    argv[argv.index("--data") + 1] = str(records)
    argv[argv.index("--context-length"):argv.index("--context-length") + 2] = []
    before = hashes(tmp_path)
    line = error_line(train_main, argv, capsys)
    assert line == f"error: {records}:2: {found}, which no record holds; fix that line"
    assert hashes(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bomb", JSON_BOMBS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_preference_file_too_deep_or_too_long_a_number_is_one_line(tmp_path, bomb,
                                                                     suffix) -> None:
    """The pairs of --objective dpo are read by the same parser (`gpt.data.records.read_items`)."""
    line_text, found = JSON_BOMBS[bomb]
    line_text = line_text.replace('"answer": "x"', '"chosen": "a", "rejected": "b"')
    pairs = tmp_path / f"pairs{suffix}"
    pairs.write_text(line_text + "\n" if suffix == ".jsonl" else f"[{line_text}]")
    with pytest.raises(UserError) as info:
        load_pairs(pairs)
    where = f"{pairs}:1" if suffix == ".jsonl" else str(pairs)
    assert str(info.value) == (f"{where}: {found}, which no record holds; fix "
                               f"{'that line' if suffix == '.jsonl' else 'the file'}")


@pytest.fixture(scope="module")
def hf_dir(cli_run) -> Path:
    """`cli_run`'s best weights as a Hugging Face GPT-2 directory (config.json + model.safetensors).
    """
    out = cli_run / "hf"
    if not out.exists():
        save_hf(load_checkpoint(cli_run / "runs" / "run" / "best"), out)
    return out


HF_DAMAGE = [("n_embd", "16", "n_embd must be a positive integer, got '16'"),
             ("n_layer", None, "n_layer must be a positive integer, got None"),
             ("layer_norm_epsilon", "x", "layer_norm_epsilon must be a finite number, got 'x'"),
             ("resid_pdrop", None, "resid_pdrop must be a finite number, got None"),
             ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false, got 'no'")]


def commands_reading(weights: str, path: Path, tmp_path: Path) -> dict[str, tuple]:
    """Every command that reads model weights, as (main, argv) reading `weights` (--init or
    --checkpoint) `path`; export takes a checkpoint only."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("Every effort moves you forward. " * 20)
    weights_flags = [f"--{weights}", str(path)]
    commands = {
        "generate": (generate_main, [*weights_flags, "--max-new-tokens", "2"]),
        "evaluate": (evaluate_main, [*weights_flags, "--data", str(corpus), "--data-dir",
                                     str(tmp_path / "data")]),
        "explain": (explain_main, [*weights_flags, "--text", "Every effort moves you"]),
    }
    if weights == "init":
        flags = train_flags(tmp_path, "--init", str(path))
        flags[flags.index("--preset"):flags.index("--preset") + 6] = []  # the shape is the weights'
        flags[flags.index("--run-name") + 1] = "from_weights"
        commands["train"] = (train_main, flags)
    else:
        commands["export"] = (export_main, [str(path), str(tmp_path / "exported")])
    return commands


@pytest.mark.parametrize(("field", "value", "message"), HF_DAMAGE)
@pytest.mark.parametrize("name", ["generate", "evaluate", "explain", "train"])
def test_a_hugging_face_config_with_a_wrong_value_is_one_line_in_every_command(
        tmp_path, capsys, hf_dir, field, value, message, name) -> None:
    model_dir = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    config = model_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    main, argv = commands_reading("init", model_dir, tmp_path)[name]
    before = hashes(tmp_path)
    assert error_line(main, argv, capsys) == f"error: {config} is not a valid model config: {message}"  # noqa: E501
    assert hashes(tmp_path) == before


@pytest.mark.parametrize(("field", "value", "message"), [
    ("emb_dim", None, "GPTConfig.emb_dim must be a positive integer, got None"),
    ("drop_rate", "0.1", "GPTConfig.drop_rate must be a finite number, got '0.1'"),
    ("tie_embeddings", "no", "GPTConfig.tie_embeddings must be true or false, got 'no'")])
@pytest.mark.parametrize("name", ["generate", "evaluate", "explain", "export", "train --init"])
def test_our_config_with_a_wrong_value_is_one_line_in_every_command(tmp_path, capsys, cli_run,
                                                                    field,
                                                                    value, message, name) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    config = run_dir / "best" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    weights = "init" if name == "train --init" else "checkpoint"
    main, argv = commands_reading(weights, run_dir / "best", tmp_path)[name.split()[0]]
    before = hashes(tmp_path)
    assert error_line(main, argv, capsys) == f"error: {config} is not a valid model config: {message}"  # noqa: E501
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("bomb", JSON_BOMBS)
@pytest.mark.parametrize("name", ["generate", "train --init"])
def test_a_config_too_deep_or_too_long_a_number_is_one_line_without_pythons_advice(
        tmp_path, capsys, cli_run, bomb, name) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    config = run_dir / "best" / "config.json"
    config.write_text(JSON_BOMBS[bomb][0].replace('"answer": "x"', '"emb_dim": 16'))
    weights = "init" if name == "train --init" else "checkpoint"
    main, argv = commands_reading(weights, run_dir / "best", tmp_path)[name.split()[0]]
    before = hashes(tmp_path)
    line = error_line(main, argv, capsys)
    assert line.startswith(f"error: cannot read {config} ({JSON_BOMBS[bomb][1]}); it should hold")
    assert "sys.set_int_max_str_digits" not in line and hashes(tmp_path) == before


def test_an_absurd_model_shape_is_refused_with_its_size(tmp_path, capsys) -> None:
    argv = train_flags(tmp_path, "--emb-dim", str(10**9))
    line = error_line(train_main, argv, capsys)
    assert line.startswith("error: GPTConfig describes a model of about 2.4e+19 parameters "
                           "(9.6e+07 TB in "
                           "float32; emb_dim 1000000000, n_layers 2, vocab_size 50257")
    assert line.endswith("more than any machine holds (at most 1.1e+12 here); make it smaller")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("change", "problem"), [
    (lambda state: state.pop("train_config"), "'train_config' is missing, not a dict"),
    (lambda state: state.pop("state"), "'state' is missing, not a dict"),
    (put("train_config.prompt_template", ["alpaca"]),
     "its settings: --prompt-template must be str or none, got ['alpaca']"),
    (put("train_config.prompt_template", 7), "its settings: --prompt-template must be str or none, "
                                             "got 7"),
])
@pytest.mark.parametrize("name", ["generate", "export"])
def test_generate_and_export_check_a_training_state_as_resume_does(tmp_path, capsys, cli_run,
                                                                   change,
                                                                   problem, name) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    damage_state(run_dir / "best", change)
    main, argv = commands_reading("checkpoint", run_dir, tmp_path)[name]
    before = hashes(tmp_path)
    line = error_line(main, argv, capsys)
    state = run_dir / "best" / "train_state.pt"
    fix = ("pass --raw to sample without the run's prompt template (then train_state.pt is not "
           "read), or use another checkpoint" if name == "generate" else
           f"move {state} aside to export the weights without a record of their training, or "
           f"export "
           "another checkpoint")
    assert line == f"error: {state} is not a complete training state ({problem}); {fix}"
    assert hashes(tmp_path) == before


def test_the_export_of_an_older_run_without_a_newer_setting_describes_it(tmp_path, capsys,
                                                                         cli_run) -> None:
    """A setting added since the run was saved (`val_data`, say) has its default, as on resume."""
    run_dir = copied_run(cli_run, tmp_path)
    damage_state(run_dir / "best", lambda state: state["train_config"].pop("val_data"))
    export_main([str(run_dir), str(tmp_path / "exported")])
    assert "- validation data: the last 10% of the training text" in (tmp_path / "exported" /
                                                                        "README.md").read_text()


@pytest.mark.parametrize(("content", "problem"), [
    (b"step,epoch\n1,\xff\xfe\n", "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff"),
    (None, "TypeError: float() argument must be a string or a real number, not 'NoneType'"),
    (b"stop,epoch\n0,0.0\n", "its header has no step column"),
])
def test_a_damaged_metrics_file_on_resume_is_one_line_and_changes_nothing(tmp_path, capsys, cli_run,
                                                                          content, problem) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    metrics = run_dir / "metrics.csv"
    if content is None:  # a short row: the last one cut after its third value
        lines = metrics.read_bytes().splitlines(keepends=True)
        content = b"".join(lines[:-1]) + b",".join(lines[-1].split(b",")[:3]) + b"\n"
    metrics.write_bytes(content)
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir)], capsys)
    assert line.startswith(f"error: {metrics} is damaged ({problem}")
    assert line.endswith("restore it, or move it aside to resume with a new one (without the rows "
                         "before the checkpoint)")
    assert hashes(tmp_path) == before


def sharded_run(cli_run: Path, tmp_path: Path) -> Path:
    """A copy of `cli_run` made an FSDP run's as one process can write it: its checkpoints' weights
    in sharded/ (DCP's files; last/ without a model.safetensors, as mid-run), AdamW's state left out
    (as at step 0), its setting --parallel fsdp."""
    run_dir = copied_run(cli_run, tmp_path)
    for name in ("last", "best"):
        checkpoint = run_dir / name
        model = load_checkpoint(checkpoint)

        def shard(state: dict) -> None:
            state.update(sharded=True, train_config={**state["train_config"], "parallel": "fsdp"})
            del state["optimizer"]

        damage_state(checkpoint, shard)
        with warnings.catch_warnings():  # DCP warns that it writes as one process: so it does
            warnings.simplefilter("ignore")
            dcp.save({"model": get_model_state_dict(model)},
                     storage_writer=dcp.FileSystemWriter(checkpoint / "sharded"), no_dist=True)
        if name == "last":
            (checkpoint / "model.safetensors").unlink()
    return run_dir


def test_an_fsdp_run_resumes_in_one_process_with_parallel_ddp_as_the_error_says(tmp_path, capsys,
                                                                               cli_run) -> None:
    run_dir = sharded_run(cli_run, tmp_path)
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir)], capsys)
    assert line == ("error: --parallel fsdp (given, or the setting of the run resumed) shards the "
                    "model over processes that torchrun starts; launch with torchrun "
                    "--nproc_per_node=N train.py ..., or pass --parallel ddp to train in one "
                    "process (an FSDP run's checkpoint resumes in one process too)")
    assert hashes(tmp_path) == before
    train_main(["--resume", str(run_dir), "--parallel", "ddp", "--max-steps", "4"])
    assert load_train_state(run_dir / "last")["state"]["step"] == 4


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_or_missing_fsdp_shard_is_one_line_without_unsafe_advice(tmp_path, capsys,
                                                                           cli_run,
                                                                           damage) -> None:
    """DCP raises a `CheckpointException` (a `BaseException`) whose message is whole tracebacks."""
    run_dir = sharded_run(cli_run, tmp_path)
    shard = next((run_dir / "last" / "sharded").glob("*.distcp"))
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir), "--parallel", "ddp"], capsys)
    assert line.startswith(f"error: cannot load the sharded checkpoint "
                           f"{run_dir / 'last' / 'sharded'} (")
    assert ("FileNotFoundError" if damage == "missing" else "RuntimeError") in line
    assert line.endswith("it is damaged, incomplete or was written for another model; resume from "
                         "another checkpoint (best/)")
    assert "weights_only" not in line and "CheckpointException" not in line
    assert hashes(tmp_path) == before


def deny(monkeypatch, method: str, target: Path) -> None:
    """Make `Path.<method>` raise PermissionError on `target`, as for a user without the permission
    (tests run as root, whom no permission stops)."""
    real = getattr(Path, method)

    def denied(self, *args, **kwargs):
        if Path(self) == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)


@pytest.mark.parametrize(("method", "where"), [("read_text", "metrics.csv"), ("iterdir", ""),
                                               ("is_file", "train_state.pt")])
def test_a_run_directory_or_metrics_file_this_user_may_not_read_is_one_line(
        tmp_path, capsys, cli_run, monkeypatch, method, where) -> None:
    run_dir = copied_run(cli_run, tmp_path)
    target = run_dir / where if where else run_dir
    deny(monkeypatch, method, target)
    before = hashes(tmp_path)
    line = error_line(train_main, ["--resume", str(run_dir)], capsys)
    assert line == (f"error: permission denied: this user may not read or write {target}; change "
                    f"its "
                    "permissions (or its directory's), run as its owner, or use another path")
    assert hashes(tmp_path) == before


def test_a_run_directory_this_user_may_not_make_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    deny(monkeypatch, "mkdir", tmp_path / "runs" / "run")
    line = error_line(train_main, train_flags(tmp_path), capsys)
    assert line == (f"error: cannot create the run directory {tmp_path / 'runs' / 'run'} "
                    f"(Permission "
                    "denied); choose another --out")


def test_a_run_name_of_bytes_that_are_not_utf8_is_one_line_before_the_directory_is_made(tmp_path) -> None:  # noqa: E501
    name = b"r\xe9sum\xe9"  # latin-1 bytes, not UTF-8, typed on the command line
    flags = [os.fsencode(arg) for arg in train_flags(tmp_path)]
    flags[flags.index(b"--run-name") + 1] = name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True,
                          text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    run_dir = str(tmp_path / "runs" / os.fsdecode(name))  # 'r\udce9sum\udce9': lone surrogates
    assert one_error_line(proc) == (f"error: the run directory {run_dir!a} is not UTF-8 text (it "
                                    f"holds "
                                    "bytes of another encoding); give --out and --run-name in "
                                    "UTF-8")
    assert not (tmp_path / "runs").exists()


def test_an_openai_checkpoint_file_that_is_not_utf8_is_one_line(tmp_path, capsys) -> None:
    model_dir = tmp_path / "openai"
    model_dir.mkdir()
    (model_dir / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 16, "n_embd": 16,
                                                        "n_head": 2, "n_layer": 2}))
    (model_dir / "checkpoint").write_bytes(b'model_checkpoint_path: "\xff\xfe"\n')
    before = hashes(tmp_path)
    line = error_line(generate_main, ["--init", str(model_dir)], capsys)
    assert line.startswith(f"error: cannot read {model_dir / 'checkpoint'} (UnicodeDecodeError: ")
    assert line.endswith('it should be the text line model_checkpoint_path: "model.ckpt"; write '
                         'that line '
                         "into it, or delete it")
    assert hashes(tmp_path) == before


# ---- the right form, the right advice -----------------------------------------------------------


def test_a_data_file_this_user_may_not_read_is_not_called_a_full_disk(tmp_path, capsys,
                                                                       monkeypatch) -> None:
    flags = train_flags(tmp_path)
    corpus = tmp_path / "corpus.txt"
    deny(monkeypatch, "open", corpus)
    line = error_line(train_main, flags, capsys)
    assert line == (f"error: permission denied: this user may not read {corpus}; change its "
                    f"permissions "
                    "(or its directory's), run as its owner, or use another path")
    assert not (tmp_path / "runs").exists()


def test_weights_this_user_may_not_read_are_not_called_missing_or_truncated(tmp_path, capsys,
                                                                            cli_run,
                                                                           monkeypatch) -> None:
    weights = cli_run / "runs" / "run" / "best" / "model.safetensors"
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != weights and real(path,
                                                                                              mode))
    for main, argv in commands_reading("checkpoint", weights.parent, tmp_path).values():
        assert error_line(main, argv, capsys) == (
            f"error: permission denied: this user may not read {weights}; change its permissions "
            f"(or its "
            "directory's), run as its owner, or use another path")


def test_explain_plot_to_a_directory_says_to_name_a_file(tmp_path, capsys, cli_run) -> None:
    line = error_line(explain_main, ["--checkpoint", str(cli_run / "runs" / "run"), "--text",
                                     "Hello",
                                     "--plot", str(tmp_path)], capsys)
    assert line == (f"error: --plot {tmp_path} is a directory; give a file to draw to, e.g. --plot "
                    f"{tmp_path / 'losses.png'}")


def test_an_export_path_under_a_file_says_the_file_is_in_the_way(tmp_path, capsys, cli_run) -> None:
    (tmp_path / "notes.txt").write_text("a file")
    before = hashes(tmp_path)
    out_dir = tmp_path / "notes.txt" / "export"
    line = error_line(export_main, [str(cli_run / "runs" / "run"), str(out_dir)], capsys)
    assert line == (f"error: cannot write {out_dir}: {tmp_path / 'notes.txt'} is a file, not a "
                    f"directory; "
                    "choose a path under a directory")
    assert hashes(tmp_path) == before
