"""Data-parallel training over the processes `torchrun` starts: every multi-process concern in one place.

    init_distributed(cfg)        the process group from torchrun's environment, or none (one process)
    Dist.wrap(model, loss, ...)  the loss the training steps call: under DDP, or with the model sharded
    Dist.grad_sync(last)         gradients reduced on a step's last micro-batch only
    Dist.clip_grad_norm(...)     the global gradient norm, clipped (over every rank's shards under FSDP)
    Dist.sum / mean / any / ...  the all-reduces of the numbers every rank must agree on
    Dist.add_rank_state(state)   every rank's random generators and the world size, in a checkpoint
    Dist.restore_rngs(saved)     ... and back

`torchrun --nproc_per_node=N train.py ...` starts N copies of train.py with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; a plain `python train.py` sets none of them, and then
nothing here does anything (`Dist()` with one rank: every all-reduce returns its input). Each rank
trains on a disjoint slice of every global batch of `batch_size x world_size` windows, cut from the one
seeded order all ranks share (`gpt.data.windows.ResumableSampler`, or `gpt.training.record_data.BucketBatchSampler`
for records), so the global batches are those a single process with `--batch-size batch_size x
world_size` trains on. The loss of a step is normalised by the step's global count of target tokens
(`gpt.model.loss.count_targets`, summed over ranks; DPO's: pairs), and DDP (or FSDP) averages the gradients
over ranks; `train_step` multiplies by the world size, so the gradient is that of the global batch's
mean loss, as in one process. The numbers that decide what happens next (the loss, the validation
losses, Ctrl-C) are all-reduced, so every rank decides the same and none is left waiting in a
collective. Rank 0 alone prints and writes files; the other ranks' stdout goes nowhere.

`--parallel ddp` keeps a whole model on every rank (`DistributedDataParallel`). `--parallel fsdp`
shards it (`torch.distributed.fsdp.fully_shard`, FSDP2): each block, then the rest at the root, so a
rank holds 1/N of the parameters, gradients and AdamW moments and gathers one block's parameters at a
time for its forward and backward. Every forward is then a collective: all ranks run the same ones,
evaluation and samples included (`gpt.training.report`), and checkpoints are written by all ranks together
(`gpt.training.sharded_checkpoint`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gpt.base.device import pick_device, training_dtype
from gpt.base.errors import UserError
from gpt.base.rng import rng_state, set_rng_state
from gpt.model.model import GPT
from gpt.training.settings import TrainConfig

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    """This process's place among the ranks, and the all-reduces the training loop calls."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """This rank's device: `cuda:LOCAL_RANK` on GPUs (one GPU per rank), else the one `--device` names."""
    parallel: str = "ddp"
    """--parallel: ddp, or fsdp (the model sharded over the ranks); only read with more than one rank."""
    ddp: DistributedDataParallel | None = None
    """The wrapped model once `wrap` made it (None in one process and under FSDP)."""
    fsdp: FSDPModule | None = None
    """The sharded model once `wrap` sharded it (None unless --parallel fsdp on several ranks)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the ranks (FSDP): then every forward is a collective."""
        return self.parallel == "fsdp" and self.world_size > 1

    def wrap(self, model: GPT, loss: Callable[..., Tensor], *, compile: bool = False,
             seed: int = 0) -> Callable[..., Tensor]:
        """What the training steps call for `loss`, the objective's loss of `model` (a function of
        its forward, compiled by the objective when there is one process): in one process `loss`
        itself; under DDP across ranks (compiled whole with `compile`); under FSDP with `model`
        sharded in place (its blocks compiled with `compile`). Build the optimizer after this: FSDP
        replaces the parameters with their shards."""
        if self.world_size == 1:
            return loss
        # Every rank built the same model from the same seed (DDP also broadcasts rank 0's); from
        # here each rank draws its own dropout masks, as the different rows of one batch would.
        torch.manual_seed(seed + self.rank)
        if self.sharded:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in model.blocks:  # one block's parameters gathered at a time
                if compile:
                    block.compile()
                fully_shard(block, mesh=mesh)
            self.fsdp = fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, (tied) head
            unpatched = model.loss
            register_fsdp_forward_method(model, "loss")  # model.loss gathers the root's shards too
            # An objective that trains on model.loss itself took it before it was patched: the
            # patched one, else the root's shards (the embeddings) are never gathered.
            return model.loss if loss == unpatched else loss  # or via model.forward
        self.ddp = DistributedDataParallel(
            _Loss(model, loss),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)  # the buffers (the causal mask) never change: none to send
        return torch.compile(self.ddp) if compile else self.ddp

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's backward: DDP all-reduces (FSDP reduce-scatters) gradients only on
        the step's `last` one (the others' gradients add up locally, and one reduction carries them all)."""
        if self.fsdp is not None:
            self.fsdp.set_requires_gradient_sync(last)
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients of `model` to `max_norm` in total; return their norm before clipping.
        Under FSDP each rank holds a shard of every gradient: the norm is over all of them."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def barrier(self) -> None:
        """Return once every rank is here: at the end of training, so that no rank goes on (to read
        the checkpoints, in a resumed run) before rank 0 has finished writing them."""
        if self.world_size > 1:
            torch_dist.barrier()

    def _all_reduce(self, values: Tensor, op: torch_dist.ReduceOp.RedOpType) -> Tensor:
        values = values.to(self.device)  # NCCL reduces GPU tensors only
        torch_dist.all_reduce(values, op=op)
        return values

    def sum(self, counts: list[int]) -> list[int]:
        """Each of `counts` summed over ranks (a step's token counts)."""
        if self.world_size == 1:
            return counts
        return self._all_reduce(torch.tensor(counts, dtype=torch.int64), torch_dist.ReduceOp.SUM).tolist()

    def sum_values(self, values: list[float]) -> list[float]:
        """Each of `values` summed over ranks, in float64 (an evaluation's loss total and token count)."""
        if self.world_size == 1:
            return values
        return self._all_reduce(torch.tensor(values, dtype=torch.float64), torch_dist.ReduceOp.SUM).tolist()

    def mean(self, value: Tensor) -> Tensor:
        """A scalar tensor averaged over ranks (a step's loss)."""
        if self.world_size == 1:
            return value
        return self._all_reduce(value.detach().clone(), torch_dist.ReduceOp.SUM) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (Ctrl-C reached some ranks but not yet others)."""
        if self.world_size == 1:
            return flag
        return bool(self._all_reduce(torch.tensor(int(flag)), torch_dist.ReduceOp.MAX))

    def add_rank_state(self, state: dict[str, Any]) -> bool:
        """Add to `state` (a checkpoint's train state, with rank 0's generators as "rng") every rank's
        generators ("rank_rngs", by rank) and the world size; True on rank 0, the one that writes it.
        Every rank must call it (a collective)."""
        state["world_size"] = self.world_size
        if self.world_size > 1:
            rngs: list[Any] = [None] * self.world_size
            torch_dist.all_gather_object(rngs, rng_state(self.device))
            state["rank_rngs"] = rngs
        return self.is_main

    def restore_rngs(self, saved: dict[str, Any]) -> None:
        """After `gpt.training.resume.restore` set rank 0's generators: this rank's own, when the checkpoint was
        taken with as many ranks; with another count, a seed of this rank's own (dropout differs from
        the run that was stopped, the data order does not)."""
        if self.world_size == 1:
            return
        rngs = saved.get("rank_rngs", [])
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank], self.device)
        else:
            torch.manual_seed(saved["train_config"]["seed"] + saved["state"]["step"] + self.rank)


class _Loss(nn.Module):
    """The training loss (the objective's, of `model`) as a module's forward: what DDP
    wraps (DDP syncs the gradients of the parameters of `model`, a submodule, that its forward used)."""

    def __init__(self, model: GPT, loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss  # bound to `model` (and a frozen teacher, whose parameters DDP never sees)

    def forward(self, *batch: Tensor, chunk_size: int = 0) -> Tensor:
        return self.loss(*batch, chunk_size=chunk_size)  # the batch's tensors, as the objective's


def init_distributed(cfg: TrainConfig) -> tuple[TrainConfig, Dist]:
    """(settings, this rank) from torchrun's environment variables; one process without them.

    NCCL on CUDA (rank r on `cuda:LOCAL_RANK`), gloo on the CPU. The ranks agree on the run name (a
    default one is rank 0's start time). `cfg.dist_timeout` bounds how long a rank waits in a
    collective for a rank that died or raised before it fails too. The group is left at exit.
    """
    if "WORLD_SIZE" not in os.environ:
        if cfg.parallel == "fsdp":
            raise UserError("--parallel fsdp shards the model over processes that torchrun starts; "
                            "launch with torchrun --nproc_per_node=N train.py ..., or drop --parallel")
        return cfg, Dist(device=pick_device(cfg.device))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun "
                        "--nproc_per_node=N train.py ..., or unset WORLD_SIZE for one process")
    rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(cfg.device)  # --device cuda (NCCL) on a machine without CUDA: an error here
    if device.type == "mps":
        raise UserError("an Apple GPU cannot be shared by several processes; use --device cpu with torchrun")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                            "visible; use --nproc_per_node at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg.parallel == "fsdp" and training_dtype(cfg.dtype, device) == torch.float16:
        raise UserError("--parallel fsdp does not train in float16: its loss scaler would see one rank's "
                        "shard of the gradients only; use --dtype bfloat16 (or float32)")
    if not torch_dist.is_initialized():  # a second run in the same process (tests) reuses the group
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                      world_size=world_size,
                                      timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        atexit.register(torch_dist.destroy_process_group)
        if rank != 0:  # rank 0 alone speaks; errors still reach stderr
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the process's life)
    if cfg.run_name is None:
        names = [time.strftime("%Y%m%d-%H%M%S")]
        torch_dist.broadcast_object_list(names, src=0)
        cfg = replace(cfg, run_name=names[0])
    return cfg, Dist(rank, world_size, device, cfg.parallel)

