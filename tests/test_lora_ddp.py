"""LoRA and activation checkpointing under torchrun: 2 CPU ranks (gloo) equal one process with twice
the batch, with DDP (LoRA, LoRA + activation checkpointing, activation checkpointing) and FSDP
(activation checkpointing; LoRA is refused with FSDP, test_lora.py)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import (
    STEPS,
    _free_port,
    _record,
    _torchrun_env,
    assert_close_params,
    cfg_for,
    losses,
    results,
)
from tiny_runs import TOKENS

from gpt.checkpoints.checkpoint import save_model
from gpt.checkpoints.weights import load_pretrained
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training import trainer
from gpt.training.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2


def configs(out: Path, base: Path, batch_size: int) -> dict[str, TrainConfig]:
    """The runs, each on 2 ranks (`batch_size` 2) and in one process (4). Dropout off: each rank
    draws its own masks, which one process cannot draw alike."""
    lora = dict(init=str(base), lora_rank=4, lora_dropout=0.0)
    runs = {"lora": lora, "lora_ac": {**lora, "activation_checkpointing": True},
            "ac": {"activation_checkpointing": True}}
    if batch_size == 2:
        runs["ac_fsdp"] = {"activation_checkpointing": True, "parallel": "fsdp"}
    prefix = "one_" if batch_size == 4 else ""
    return {name: cfg_for(out, prefix + name, batch_size=batch_size, **settings)
            for name, settings in runs.items()}


def _rank_main(rank: int, port: int, out: Path, base: Path) -> None:
    os.environ.update(_torchrun_env(rank, port))
    torch.set_num_threads(1)
    for name, cfg in configs(out, base, batch_size=2).items():
        _record(out, name, rank, trainer.train(cfg, token_ids=TOKENS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_ddp")
    base = out / "base"
    base.mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(4)
        save_model(GPT(GPTConfig.preset("tiny")), base)
        for name, cfg in configs(out, base, batch_size=4).items():
            _record(out, "one_" + name, 0, trainer.train(cfg, token_ids=TOKENS))
    mp.start_processes(_rank_main, args=(_free_port(), out, base), nprocs=WORLD,
                       start_method="spawn")
    return out


@pytest.mark.parametrize("name, one", [("lora", "one_lora"), ("lora_ac", "one_lora"),
                                       ("ac", "one_ac"), ("ac_fsdp", "one_ac")])
def test_two_ranks_with_adapters_or_recomputation_equal_one_process(runs, name, one) -> None:
    rank0, rank1 = results(runs, name)
    reference = losses(one_process(runs, one))
    assert losses(rank0) == losses(rank1)
    assert len(reference) == STEPS
    assert losses(rank0) == pytest.approx(reference, rel=1e-5)
    assert_close_params(dict(load_pretrained(runs / name / "last").named_parameters()),
                        dict(load_pretrained(runs / one / "last").named_parameters()))


def test_one_process_with_recomputation_equals_it_without(runs) -> None:
    assert one_process(runs, "one_lora_ac")["losses"] == one_process(runs, "one_lora")["losses"]


def one_process(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.0.json").read_text())
