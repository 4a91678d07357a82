"""Data-parallel training on 2 CPU ranks (gloo), DDP and FSDP, against one process with twice the batch.

The 2-rank runs are started with `torch.multiprocessing` from this file (`_rank_main`), each rank
with torchrun's environment variables on a free port; rank r writes what its runs returned as JSON,
the test process compares it with one-process runs of its own.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_runs import TOKENS, assert_same_params, params, tiny
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from gpt import distributed, trainer
from gpt.checkpoint import WEIGHTS_FILE, load_model
from gpt.data import ResumableSampler, build_loaders, eval_picks
from gpt.distributed import init_distributed
from gpt.errors import UserError, run_cli
from gpt.generate_cli import main as generate_main
from gpt.loss import count_targets
from gpt.record_data import BucketBatchSampler
from gpt.resume import check_resume_settings
from gpt.sampling import generate
from gpt.sharded_checkpoint import SHARDED_DIR, SafeReader
from gpt.tokenizer import get_tokenizer
from gpt.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def cfg_for(out: Path, name: str, **overrides) -> TrainConfig:
    """The 2-rank runs' settings: batch 2 per rank (a one-process reference takes batch 4)."""
    return tiny(out, **{"drop_rate": 0.0, "max_steps": STEPS, "eval_freq": 3, "run_name": name, **overrides})


def records_file(out: Path) -> Path:
    """22 training and 2 validation records (the default --val-fraction) of unequal lengths: answers
    of 1 to 4 words, prompts masked, so every batch has its own count of targets."""
    path = out / "records.jsonl"
    if not path.exists():
        words = ["Kalo", "Mizu", "Rate", "Voni", "Sape", "Dogu"]
        rows = [{"question": f"What is the capital of {words[i % 6]}{words[i // 6 % 6]}?",
                 "answer": " ".join([words[(i * 5) % 6]] * (1 + i % 4))} for i in range(24)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def records_cfg(out: Path, name: str, **overrides) -> TrainConfig:
    return cfg_for(out, name, data=str(records_file(out)), context_length=None, **overrides)


def interrupted_train(cfg: TrainConfig, *, step: int, on_rank: int = 0) -> trainer.TrainResult:
    """`train(cfg)` with Ctrl-C (a real SIGINT) pressed right after optimizer step `step` on rank
    `on_rank` alone."""
    original = trainer.train_step

    def step_then_interrupt(run, batches):
        stats = original(run, batches)
        if run.state.step == step and run.dist.rank == on_rank:
            signal.raise_signal(signal.SIGINT)
        return stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "train_step", step_then_interrupt)
        return trainer.train(cfg, token_ids=TOKENS)


def _record(out: Path, name: str, rank: int, result: trainer.TrainResult) -> None:
    (out / f"{name}.{rank}.json").write_text(json.dumps(
        {"losses": {str(k): v for k, v in result.step_losses.items()}, "stop": result.stop_reason,
         "step": result.step}))


def _rank_main(rank: int, port: int, out: Path) -> None:
    """One rank of the 2-rank runs, one after the other in the same process group."""
    os.environ.update(_torchrun_env(rank, port))
    torch.set_num_threads(1)
    runs = {
        "fsdp": (cfg_for(out, "fsdp", parallel="fsdp"), None),
        "fsdp_accum": (cfg_for(out, "fsdp_accum", parallel="fsdp", grad_accum=2), None),
        "records": (records_cfg(out, "records"), None),
        "smoothed": (cfg_for(out, "smoothed", label_smoothing=0.1), None),
        "ddp": (cfg_for(out, "ddp"), None),
        "ddp_accum": (cfg_for(out, "ddp_accum", grad_accum=2), None),
        "ddp_resumes_one": (cfg_for(out, "one_half", batch_size=2), out / "one_half"),
        "dropout_straight": (cfg_for(out, "dropout_straight", drop_rate=0.1), None),
        "early": (cfg_for(out, "early", patience=1, min_delta=100.0), None),
    }
    for name, (cfg, resume) in runs.items():
        _record(out, name, rank, trainer.train(cfg, resume=resume, token_ids=TOKENS))
    for name, cfg in (("ddp_half", cfg_for(out, "ddp_half")),
                      ("fsdp_half", cfg_for(out, "fsdp_half", parallel="fsdp")),
                      ("dropout_stopped", cfg_for(out, "dropout_stopped", drop_rate=0.1))):
        # Ctrl-C reaches rank 1 alone: both ranks must stop at step 3.
        _record(out, name, rank, interrupted_train(cfg, step=3, on_rank=1))
        if name == "fsdp_half":  # resumed on 2 ranks here, and in one process by a test
            torch.distributed.barrier()
            if rank == 0:
                shutil.copytree(out / name, out / "fsdp_half_copy")
            _record(out, "fsdp_resumed", rank, trainer.train(cfg, resume=out / name, token_ids=TOKENS))
    resumed = trainer.train(cfg, resume=out / "dropout_stopped", token_ids=TOKENS)
    _record(out, "dropout_resumed", rank, resumed)
    diverging = trainer.setup(cfg_for(out, "nan"), token_ids=TOKENS)
    loss = diverging.loss
    if rank == 1:  # a non-finite loss on rank 1 alone, in step 2
        diverging.loss = lambda x, y, **kw: loss(x, y, **kw) * (math.nan if diverging.state.step == 1 else 1)
    with pytest.raises(trainer.TrainingDiverged) as raised:
        trainer.fit(diverging)
    (out / f"nan.{rank}.txt").write_text(str(raised.value))
    run = trainer.setup(cfg_for(out, "masked", grad_accum=2), token_ids=TOKENS)
    stats = trainer.train_step(run, masked_batches(rank))
    if rank == 0:
        torch.save({"loss": stats.loss, "params": params(run.model)}, out / "masked.pt")


def masked_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s 2 micro-batches of 2 rows, with targets masked (-100) as fine-tuning records are:
    a different number of target tokens in each micro-batch and on each rank."""
    generator = torch.Generator().manual_seed(rank)
    batches = []
    for micro in range(2):
        x = torch.randint(0, 50000, (2, 16), generator=generator)
        y = torch.randint(0, 50000, (2, 16), generator=generator)
        y[0, :3 + 5 * rank + 4 * micro] = -100  # a prompt's tokens count for nothing
        y[1, 16 - micro - 2 * rank:] = -100  # nor does padding
        batches.append((x, y))
    return batches


def results(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.{rank}.json").read_text()) for rank in range(WORLD)]


def losses(result: dict) -> dict[int, float]:
    return {int(k): v for k, v in result["losses"].items()}


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every 2-rank run of `_rank_main`, and the one-process runs they are compared with."""
    out = tmp_path_factory.mktemp("dist")
    with torch.random.fork_rng():
        for name, cfg in (("one", cfg_for(out, "one", batch_size=4)),
                          ("one_accum", cfg_for(out, "one_accum", batch_size=4, grad_accum=2)),
                          ("one_records", records_cfg(out, "one_records", batch_size=4)),
                          ("one_smoothed", cfg_for(out, "one_smoothed", batch_size=4, label_smoothing=0.1))):
            _record(out, name, 0, trainer.train(cfg, token_ids=TOKENS))
        interrupted_train(cfg_for(out, "one_half", batch_size=4), step=3)
    mp.start_processes(_rank_main, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
    # Resumed in one process by a test, while the 2-rank run resumed the original.
    shutil.copytree(out / "ddp_half", out / "ddp_half_copy")
    shutil.copytree(out / "fsdp_half_copy", out / "fsdp_mid_run")  # its last/ as the 2 ranks left it
    return out


@pytest.mark.parametrize("ddp, one", [("ddp", "one"), ("ddp_accum", "one_accum"),  # --grad-accum 1, 2
                                     ("fsdp", "one"), ("fsdp_accum", "one_accum"),  # sharded
                                     ("records", "one_records"),  # masked records of unequal lengths
                                     ("smoothed", "one_smoothed")])  # an objective other than cross-entropy
def test_two_ranks_equal_one_process_with_twice_the_batch(runs, ddp, one) -> None:
    rank0, rank1 = results(runs, ddp)
    reference = losses(json.loads((runs / f"{one}.0.json").read_text()))
    assert losses(rank0) == losses(rank1)  # one loss, all-reduced
    assert losses(rank0) == pytest.approx(reference, rel=1e-5)
    assert len(reference) == STEPS
    assert_close_params(params(load_model(runs / ddp / "last")), params(load_model(runs / one / "last")))
    # Validation losses (token-weighted over both ranks' batches) match the one-process ones.
    ddp_csv = np.genfromtxt(runs / ddp / "metrics.csv", delimiter=",", names=True)
    one_csv = np.genfromtxt(runs / one / "metrics.csv", delimiter=",", names=True)
    np.testing.assert_allclose(ddp_csv["val_loss"], one_csv["val_loss"], rtol=1e-5)
    if ddp != "records":  # a record batch is padded to its longest record: per rank, or all at once
        np.testing.assert_array_equal(ddp_csv["tokens_seen"], one_csv["tokens_seen"])
    if ddp == "smoothed":  # the objective's own column, averaged over both ranks' batches too
        np.testing.assert_allclose(ddp_csv["train_objective"], one_csv["train_objective"], rtol=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # FSDP's shards are read whole, into one model
def test_ctrl_c_on_one_rank_stops_both_and_the_checkpoint_resumes_in_one_process(runs, parallel) -> None:
    assert [(r["stop"], r["step"]) for r in results(runs, f"{parallel}_half")] == [("interrupted", 3)] * 2
    copy = runs / f"{parallel}_half_copy"  # resumed on 2 ranks too, from the original
    with pytest.raises(UserError, match="use --batch-size 4"):  # the global batch must stay 4
        trainer.setup(cfg_for(runs, copy.name), resume=copy, token_ids=TOKENS)
    resumed = trainer.train(cfg_for(runs, copy.name, batch_size=4), resume=copy, token_ids=TOKENS)
    straight = losses(results(runs, parallel)[0])
    assert resumed.step_losses == pytest.approx({s: v for s, v in straight.items() if s > 3}, rel=1e-5)
    assert_close_params(params(load_model(copy / "last")), params(load_model(runs / "one" / "last")))


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs) -> None:
    rank0, _ = results(runs, "ddp_resumes_one")
    straight = losses(results(runs, "ddp")[0])
    assert losses(rank0) == pytest.approx({s: v for s, v in straight.items() if s > 3}, rel=1e-5)
    assert_close_params(params(load_model(runs / "one_half" / "last")),
                        params(load_model(runs / "one" / "last")))


@pytest.mark.parametrize("straight, stopped, resumed", [
    ("dropout_straight", "dropout_stopped", "dropout_resumed"),  # DDP with dropout: every rank's generators
    ("fsdp", "fsdp_half", "fsdp_resumed")])  # FSDP: the weights and AdamW's moments, from every rank's shards
def test_two_rank_run_stopped_and_resumed_equals_a_straight_one(runs, straight, stopped, resumed) -> None:
    assert [(r["stop"], r["step"]) for r in results(runs, stopped)] == [("interrupted", 3)] * 2
    straight_losses = losses(results(runs, straight)[0])
    assert {**losses(results(runs, stopped)[0]), **losses(results(runs, resumed)[0])} == straight_losses
    assert set(losses(results(runs, resumed)[0])) == {4, 5, 6}
    assert_same_params(params(load_model(runs / stopped / "last")),
                       params(load_model(runs / straight / "last")))


def test_fsdp_checkpoints_hold_shards_and_the_whole_model_in_best_and_at_the_end(runs) -> None:
    # last/ saved at step 3, mid-run: the shards of both ranks, the whole model not gathered.
    mid_run = runs / "fsdp_mid_run" / "last"
    assert sorted(p.name for p in (mid_run / SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp",
                                                                          "__1_0.distcp"]
    assert not (mid_run / WEIGHTS_FILE).exists() and (mid_run / "train_state.pt").is_file()
    for name in ("best", "last"):  # best/ always, last/ at the end: the weights of one process's run
        assert (runs / "fsdp" / name / SHARDED_DIR / ".metadata").is_file()
        assert_close_params(params(load_model(runs / "fsdp" / name)), params(load_model(runs / "one" / name)))


def test_an_fsdp_best_checkpoint_answers_in_generate_py(runs, capsys) -> None:
    capsys.readouterr()
    run_cli(lambda: generate_main(["--checkpoint", str(runs / "fsdp"), "--prompt", "Hello", "--temperature",
                                   "0", "--max-new-tokens", "5", "--dtype", "float32", "--device", "cpu"]))
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode("Hello")])
    expected = generate(load_model(runs / "fsdp" / "best"), prompt, 5, eos_id=50256)[0, prompt.size(1):]
    assert capsys.readouterr().out == "Hello" + tokenizer.decode(expected.tolist()) + "\n"


def test_a_sharded_checkpoint_index_that_would_run_code_is_refused_unread(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"names posix\.system, which an index never holds"):
        SafeReader(tmp_path).read_metadata()
    assert not (tmp_path / "ran").exists()
    # DCP's own classes, but an entry DCP would read with torch.load(weights_only=False).
    index = Metadata(state_dict_metadata={"x": BytesStorageMetadata()})
    (tmp_path / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match="'x' is a BytesStorageMetadata"):
        SafeReader(tmp_path).read_metadata()


def test_a_non_finite_loss_on_one_rank_stops_both_at_that_step(runs) -> None:
    for rank in range(WORLD):
        message = (runs / f"nan.{rank}.txt").read_text()
        assert message.startswith("the loss is nan at step 2: training stopped")


def test_early_stopping_fires_on_both_ranks_at_the_same_evaluation(runs) -> None:
    assert [(r["stop"], r["step"]) for r in results(runs, "early")] == [("early_stop", 3)] * 2
    # Rank 0 alone wrote: one row per evaluation (steps 0 and 3), no file from rank 1.
    assert (runs / "early" / "metrics.csv").read_text().count("\n") == 3


# ---- the pieces, in this process ----------------------------------------------------------------


def test_the_ranks_batches_together_are_one_process_batches_of_twice_the_size() -> None:
    dataset = range(23)  # 5 global batches of 4; the last 3 samples make no whole one
    one = list(ResumableSampler(dataset, shuffle=True, seed=5, batch_size=4))
    ranks = [list(ResumableSampler(dataset, shuffle=True, seed=5, batch_size=2, rank=r, world_size=2))
             for r in range(2)]
    assert len(one) == 20 and len(ranks[0]) == len(ranks[1]) == 10
    for g in range(5):  # global batch g: rank 0's slice, then rank 1's
        assert ranks[0][2 * g:2 * g + 2] + ranks[1][2 * g:2 * g + 2] == one[4 * g:4 * g + 4]
    # Stopped after 2 global batches, each rank's sampler resumes where one process's would.
    sampler = ResumableSampler(dataset, shuffle=True, seed=5, batch_size=2, rank=1, world_size=2)
    taken = iter(sampler)
    assert [next(taken) for _ in range(4)] == ranks[1][:4]
    assert sampler.state_dict()["position"] == 8  # samples handed out to both ranks
    again = ResumableSampler(dataset, shuffle=True, seed=5, batch_size=2, rank=1, world_size=2)
    again.load_state_dict(sampler.state_dict())
    assert list(again) == ranks[1][4:]


def test_the_ranks_record_batches_together_are_one_process_batches() -> None:
    lengths = [(7 * i) % 13 + 1 for i in range(21)]  # 21 records: 5 global batches of 4, and 1 record
    one = list(BucketBatchSampler(lengths, 4, seed=3))
    ranks = [list(BucketBatchSampler(lengths, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 6 and len(ranks[0]) == len(ranks[1]) == 5  # the 1 record cannot go to 2 ranks
    assert [a + b for a, b in zip(*ranks, strict=True)] == [batch for batch in one if len(batch) == 4]
    # 22 records: the short global batch of 2 is shared, one record each.
    share = BucketBatchSampler([*lengths, 4], 4, seed=3, rank=1, world_size=2)
    assert sorted(len(batch) for batch in share) == [1, 2, 2, 2, 2, 2]
    # Evaluation: every rank as many batches, none empty; a lone last index left out.
    assert eval_picks(7, 2, 2, rank=0, world_size=2) == [0, 1, 4]
    assert eval_picks(7, 2, 2, rank=1, world_size=2) == [2, 3, 5, 6]
    assert eval_picks(5, 2, 2, rank=1, world_size=2) == [3, 4]  # 5 = 4 + 1: the 1 is left out


def test_bad_multi_process_settings_are_one_line_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"--parallel fsdp .* launch with torchrun"):
        init_distributed(tiny(tmp_path, parallel="fsdp"))
    # More processes than the data has windows for one global batch (23 windows, 12 x 2 > 23).
    with pytest.raises(UserError, match=r"fewer than one batch of 12 x 2 processes; lower --batch-size \(or"):
        build_loaders(*TOKENS, batch_size=12, context_length=16, stride=16, eval_batches=1, seed=0,
                      rank=0, world_size=2)
    # A run of global batch 3 cannot resume on 2 processes.
    saved = {"train_config": tiny(tmp_path, batch_size=3).to_dict()}
    with pytest.raises(UserError, match="use a number of processes that divides 3"):
        check_resume_settings(tiny(tmp_path, batch_size=1), saved, tmp_path, world_size=2)
    # A one-process (or DDP) checkpoint cannot resume under FSDP: its optimizer state is not sharded.
    saved = {"train_config": tiny(tmp_path, batch_size=4).to_dict()}
    with pytest.raises(UserError, match="resume it with --parallel ddp, or start an FSDP run from its"):
        check_resume_settings(tiny(tmp_path, parallel="fsdp"), saved, tmp_path, world_size=2)
    with pytest.raises(UserError, match="fewer than the 2 processes; use more validation data"):
        eval_picks(1, 2, 2, rank=0, world_size=2)
    for name, value in _torchrun_env(0, 1).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="drop --async-save"):  # refused before any process group is made
        init_distributed(tiny(tmp_path, parallel="fsdp", async_save=True))
    with monkeypatch.context() as gpu:  # what --dtype auto gives on a GPU without bfloat16
        gpu.setattr(distributed, "training_dtype", lambda name, device: torch.float16)
        with pytest.raises(UserError, match=r"fsdp does not train in float16: .* use --dtype bfloat16"):
            init_distributed(tiny(tmp_path, parallel="fsdp"))
    if not torch.cuda.is_available():  # NCCL needs CUDA: refused before any process group is made
        with pytest.raises(UserError, match="--device cuda is not available"):
            init_distributed(tiny(tmp_path, device="cuda"))


def test_parallel_fsdp_without_torchrun_is_one_line_on_the_command_line(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "gpt.train_cli", "--parallel", "fsdp", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --parallel fsdp") and result.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written


def _raising_rank(rank: int, port: int, out: Path) -> None:
    """Rank 1 raises in its second step; rank 0 goes on into the step's all-reduce."""
    os.environ.update(_torchrun_env(rank, port))
    torch.set_num_threads(1)
    original = trainer.train_step

    def step(run, batches):
        if run.dist.rank == 1 and run.state.step == 1:
            raise RuntimeError("rank 1 fails")
        return original(run, batches)

    trainer.train_step = step
    trainer.train(cfg_for(out, "raising", dist_timeout=20), token_ids=TOKENS)


def test_a_rank_that_raises_ends_the_job_with_a_non_zero_exit(tmp_path) -> None:
    context = mp.get_context("spawn")
    port = _free_port()
    # Plain processes, not `spawn`'s join (which would kill rank 0 itself): rank 0 must fail alone.
    ranks = [context.Process(target=_raising_rank, args=(rank, port, tmp_path)) for rank in range(WORLD)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)  # start-up and two steps, then at most the 20 s timeout: a hang fails
    alive = [process.is_alive() for process in ranks]
    for process in ranks:
        process.kill()
    assert alive == [False, False]
    assert [process.exitcode for process in ranks] != [0, 0] and all(p.exitcode != 0 for p in ranks)


def test_masked_targets_give_two_ranks_the_gradients_of_one_process(runs) -> None:
    """Normalised by the global count of targets: a rank with fewer weighs less, as in one batch."""
    ranks = [masked_batches(rank) for rank in range(WORLD)]
    together = [(torch.cat([ranks[0][i][0], ranks[1][i][0]]), torch.cat([ranks[0][i][1], ranks[1][i][1]]))
                for i in range(2)]  # global micro-batch i: rank 0's rows, then rank 1's
    run = trainer.setup(cfg_for(runs, "masked_one", batch_size=4, grad_accum=2), token_ids=TOKENS)
    stats = trainer.train_step(run, together)
    two_ranks = torch.load(runs / "masked.pt", weights_only=True)
    assert two_ranks["loss"] == pytest.approx(stats.loss, rel=1e-6)
    assert_close_params(two_ranks["params"], params(run.model))
    # Not a case that a per-rank or per-micro-batch mean would pass too: the counts differ.
    counts = [count_targets([batch]) for rank in ranks for batch in rank]
    assert len(set(counts)) == len(counts)
