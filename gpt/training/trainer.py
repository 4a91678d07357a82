"""The training loop, as a few plain functions to read top-down:

    train(cfg)                          setup + fit
      setup(cfg)                        seed, model, the objective's data and loss, optimizer,
                                        resume
      fit(run)                          an epoch at a time until done, early stopping or Ctrl-C
        _train_epoch(run, progress)     steps over the epoch's batches; says why to stop, if it
                                        should
          train_step(run, batches)      zero grads, run.loss (the objective's), backward, clip, step
          evaluate_and_save(run, ...)   every eval_freq steps (and at the end):
            run.objective.evaluate(run)   measure: train and validation loss, the objective's own
            check_finite(run, ...)        stop if one is not finite: such weights are never saved
            state.keep_score(...)         keep score for early stopping (`TrainState`)
            log_evaluation(run, ...)      metrics.csv, the printed line, loss.png
                                          (`gpt.training.report`)
            save_checkpoints(run, ...)    last/, and best/ when the validation loss improved

The loop knows no objective by name: --objective picks one (`gpt.training.run.Objective`, registered
by `gpt.objectives`), which prepares the data and the loss, and measures, lays out and prints its
evaluations. A run directory `runs/<name>/` holds `train_config.json`, `metrics.csv`
(`gpt.training.metrics`), `loss.png`, and the checkpoints `last/` (every `save_freq`-th
evaluation) and `best/` (lowest validation loss), each `model.safetensors` + `config.json` +
`train_state.pt` (`gpt.training.resume`; FSDP: `gpt.training.sharded_checkpoint`);
`gpt.training.run_dir` locks it. The settings are `gpt.training.settings.TrainConfig`; the learning
rate is a pure function of the step (`lr_at`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gpt.base.atomic import write_json
from gpt.base.device import (
    autocast,
    configure_device,
    flag_fixable_errors,
    keep_freed_memory,
    skipped_step_note,
    training_dtype,
)
from gpt.base.errors import TrainingDiverged, UserError
from gpt.base.interrupt import ctrl_c_flag
from gpt.base.rng import seed_everything
from gpt.checkpoints.lora import read_lora_record, start_adapters
from gpt.checkpoints.saver import CheckpointSaver
from gpt.checkpoints.weights import load_pretrained
from gpt.data.windows import micro_batch_groups
from gpt.eval.tasks import EvalTask, load_eval_tasks, task_accuracy
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training.distributed import Dist, init_distributed
from gpt.training.metrics import METRICS_FILE, MetricsLog
from gpt.training.optim import build_optimizer, lr_at
from gpt.training.record_data import RecordData
from gpt.training.report import log_evaluation, print_header, print_sample, print_summary
from gpt.training.resume import checkpoint_state, restore
from gpt.training.run import OBJECTIVES, Objective, Run, get_objective, may_be_best, plot_panels
from gpt.training.run_dir import OpenedRun, open_run_dir
from gpt.training.settings import RUN_CONFIG_FILE, TrainConfig
from gpt.training.sharded_checkpoint import checkpoint_model, load_sharded, save_sharded
from gpt.training.tb import TensorBoardLog

# ---- the model -----------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> GPT:
    """A fresh model: the preset's random init, or published/earlier weights for `--init`."""
    if cfg.init == "scratch":
        return GPT(GPTConfig.preset(cfg.preset, **cfg.model_overrides))
    return load_pretrained(cfg.init, **cfg.model_overrides)


def adapt(cfg: TrainConfig, model: GPT, checkpoint: Path | None) -> dict[str, Any] | None:
    """With --lora-rank, the run's LoRA record (`gpt.checkpoints.lora`, saved with each checkpoint):
    a resumed run's, whose adapters came with its checkpoint, or a new run's, whose base is frozen
    and given adapters here, before the objective and the optimizer see the model. None without."""
    if not cfg.lora_rank:
        return None
    if checkpoint is not None:
        return read_lora_record(checkpoint)
    return start_adapters(model, cfg.lora, cfg.init, cfg.model_overrides)


# ---- setup ------------------------------------------------------------------------------------


def check_objective(cfg: TrainConfig) -> Objective:
    """The objective `cfg` trains with, once it and every other registered objective have checked
    `cfg`'s settings (theirs given to a run of another objective are refused)."""
    objective = get_objective(cfg.objective)
    for other in OBJECTIVES.values():
        if other is objective:
            objective.check(cfg)
        else:
            other.check_unused(cfg)
    return objective


def setup(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> Run:
    """Build the run: seed, model, data, loaders, optimizer, run directory.

    `resume` (a run directory, or a checkpoint directory in one) continues a run where that
    checkpoint was taken; `cfg` must then agree with the run's settings on `RESUME_FIXED` (see
    `gpt.training.resume`). `token_ids` = (train, val) arrays replace `prepare_data(cfg.data, ...)`.
    Every check comes before the run directory is written to, and the run directory is locked
    (`gpt.training.run_dir`) until `fit` ends.
    """
    objective = check_objective(cfg)  # before anything is written
    # torchrun's ranks (gpt.training.distributed); one process without it
    cfg, dist = init_distributed(cfg)
    # Checked, locked (by rank 0), a resumed run's state read: nothing built yet.
    opened = open_run_dir(cfg, resume, rank=dist.rank, world_size=dist.world_size)
    try:
        return _build(cfg, objective, dist, opened, token_ids)
    except BaseException:
        opened.lock.release(failed=True)
        raise


def _build(cfg: TrainConfig, objective: Objective, dist: Dist, opened: OpenedRun,
           token_ids: tuple[np.ndarray, np.ndarray] | None) -> Run:
    """The rest of `setup`, in the run directory `opened` (locked)."""
    run_dir, checkpoint, saved = opened.path, opened.checkpoint, opened.saved
    cfg = dataclasses.replace(cfg, out=str(run_dir.parent), run_name=run_dir.name)
    device = dist.device
    configure_device(device)
    dtype = training_dtype(cfg.dtype, device)
    if cfg.keep_freed_memory:
        keep_freed_memory()

    seed_everything(cfg.seed)
    model = checkpoint_model(checkpoint, device) if checkpoint else build_model(cfg).to(device)
    lora = adapt(cfg, model, checkpoint)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    model_context = model.config.context_length
    context_length = cfg.context_length or model_context
    if context_length > model_context:
        raise UserError(f"--context-length {context_length} exceeds the model's context length "
                        f"{model_context}; use --context-length {model_context} or less")
    prepared = objective.prepare(cfg, model, context_length, token_ids, dist=dist, dtype=dtype,
                                 compile=cfg.compile and dist.world_size == 1)
    train_loader, records = prepared.train_loader, prepared.records
    if records is not None:  # a run on records: the template is kept with the run
        cfg = dataclasses.replace(cfg, prompt_template=records.template)
    batches_per_epoch = len(train_loader)  # whole batches (drop_last); the sampler is at its start
    if cfg.eval_task and dist.sharded:
        raise UserError("--eval-task scores through the model's layers one by one, which FSDP's "
                        "shards do not allow; use --parallel ddp, or drop --eval-task")
    tasks = load_eval_tasks(cfg.eval_task, cfg.eval_task_limit, context_length)
    # Before the optimizer: FSDP replaces the parameters.
    loss = dist.wrap(model, prepared.loss, compile=cfg.compile, seed=cfg.seed)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    steps = math.ceil(batches_per_epoch / cfg.grad_accum) * cfg.epochs
    run = Run(
        cfg=cfg, run_dir=run_dir, model=model, objective=objective, loss=loss,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type,
                                                         enabled=dtype == torch.float16),
        train_loader=train_loader, eval_loaders=prepared.eval_loaders, device=device, dtype=dtype,
        total_steps=min(steps, cfg.max_steps or steps),
        tokens_per_epoch=records.tokens_per_epoch if records else batches_per_epoch * cfg.batch_size
        * dist.world_size * context_length,
        metrics=metrics_log(objective, cfg, records, run_dir, tasks), records=records, dist=dist,
        tasks=tasks, saver=CheckpointSaver(background=cfg.async_save), lock=opened.lock,
        start=prepared.start, lora=lora,
    )
    # restore also sets the random generators: nothing below draws from them
    if checkpoint is not None:
        # an FSDP checkpoint's weights and AdamW state
        load_sharded(checkpoint, model, optimizer, saved)
        run.state = restore(saved, checkpoint, optimizer=optimizer, scaler=run.scaler,
                            sampler=run.sampler,
                            num_windows=len(run.windows), device=device)
        dist.restore_rngs(saved)
        # A changed --weight-decay and changed --adam-betas win over the checkpoint's.
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
        for group in optimizer.param_groups:
            group["betas"] = cfg.betas
    # every rank has checked the run directory: DDP's set-up waited for all of them
    if dist.is_main:
        # Steps after the checkpoint (all, for a start at step 0) are taken again, and log again.
        run.metrics.truncate(up_to_step=run.state.step if checkpoint is not None else -1)
        if cfg.tensorboard:  # on resume, its events after the checkpoint are dropped too
            run.tensorboard = TensorBoardLog(run_dir, purge_step=run.state.step + 1 if checkpoint
                                             else None)
        write_json(run_dir / RUN_CONFIG_FILE, cfg.to_dict())
    return run


def metrics_log(objective: Objective, cfg: TrainConfig, records: RecordData | None, run_dir: Path,
                tasks: Sequence[EvalTask] = ()) -> MetricsLog:
    """The run's metrics.csv: the objective's columns and plot, then one column (and one line of the
    plot's lower panel) per benchmark task."""
    columns = objective.columns(cfg, records)
    scored = tuple(task.column for task in tasks)
    panels = {**plot_panels(objective, columns), **({"task accuracy": scored} if scored else {})}
    return MetricsLog(run_dir / METRICS_FILE, columns + scored, loss_name=objective.loss_name,
                      accuracy=objective.accuracy_column(columns), panels=panels)


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int


@dataclass
class TrainResult:
    """How a run ended."""

    run_dir: Path
    stop_reason: str
    """done (all steps), early_stop (patience ran out) or interrupted (Ctrl-C; last/ saved)."""
    step: int
    best_step: int
    best_val_loss: float
    step_losses: dict[int, float]
    """Training loss of every step taken in this call, by step number (1 = the first step)."""


@dataclass
class _Progress:
    """What `fit` keeps from step to step besides the run: the bar, the losses, the speed."""

    bar: tqdm
    interrupted: Callable[[], bool]  # True once Ctrl-C was pressed (`ctrl_c_flag`)
    val_loss: float = math.nan  # the latest evaluation's, for the bar
    step_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0  # trained on since the last evaluation: with `seconds`, the next row's tokens/s
    seconds: float = 0.0  # spent in steps (not evaluating) since the last evaluation


def train(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train a GPT as `cfg` says (see `setup` for `resume` and `token_ids`). Out of memory and a
    failed `--compile` end in a one-line `UserError` naming the flags that fix them."""
    with flag_fixable_errors("lower --batch-size (raising --grad-accum keeps the step's tokens), "
                             "or set --loss-chunk, or use --dtype bfloat16"):
        return fit(setup(cfg, resume=resume, token_ids=token_ids))


def fit(run: Run) -> TrainResult:
    """Train until all steps are done, early stopping fires, or Ctrl-C; see the module docstring."""
    state = run.state
    print_header(run)
    logged = run.metrics.rows()  # a resumed run's, up to its checkpoint
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=None if run.dist.is_main else True)  # None: shown on a terminal
    # Left in reverse order: the saver's last write ends before the lock is released.
    events = run.tensorboard or contextlib.nullcontext()
    with run.lock, bar, ctrl_c_flag() as interrupted, run.saver, events:
        progress = _Progress(bar, interrupted, val_loss=logged[-1]["val_loss"] if logged
                             else math.nan)
        # the untrained model's losses (a step-0 checkpoint has them)
        if state.step == 0 and not logged:
            progress.val_loss = evaluate_and_save(run)["val_loss"]
        stop = None
        while stop is None:
            stop = _train_epoch(run, progress)
    run.dist.barrier()  # rank 0's last save (in the background) is on disk before any rank returns
    if stop != "interrupted":
        print_sample(run, "at the end")
    print_summary(run, stop)
    return TrainResult(run.run_dir, stop, state.step, state.best_step, state.best_val_loss,
                       progress.step_losses)


def _train_epoch(run: Run, progress: _Progress) -> str | None:
    """The rest of the current epoch, a step at a time, with an evaluation every `eval_freq` steps.

    Returns why training should stop (done, early_stop, interrupted), or None when the epoch ran out
    first (after printing a sample). Ctrl-C is read between steps only, and last/ is saved at that
    step before returning "interrupted".
    """
    cfg, state = run.cfg, run.state
    if state.step >= run.total_steps:  # a resumed run that had finished
        return "done"
    epoch = run.sampler.epoch
    for batches in micro_batch_groups(run.train_loader, cfg.grad_accum):
        started = time.perf_counter()
        stats = train_step(run, batches)
        progress.seconds += time.perf_counter() - started
        progress.tokens += stats.tokens
        progress.step_losses[state.step] = stats.loss
        evaluated = state.step % cfg.eval_freq == 0 or state.step == run.total_steps
        if evaluated:
            row = evaluate_and_save(run, stats, progress.tokens / progress.seconds)
            progress.val_loss, progress.tokens, progress.seconds = row["val_loss"], 0, 0.0
        progress.bar.set_postfix(loss=f"{stats.loss:.3f}", val=f"{progress.val_loss:.3f}",
                                 lr=f"{stats.lr:.1e}", refresh=False)
        progress.bar.update()
        if evaluated and 0 < cfg.patience <= state.evals_since_best:
            return "early_stop"
        if state.step >= run.total_steps:
            return "done"
        if run.dist.any(progress.interrupted()):  # every rank stops at the same step
            if run.last_saved != state.step:  # last/ is older than this step
                save_checkpoints(run, last=True, best=False, final=True)
            return "interrupted"
    print_sample(run, f"after epoch {epoch + 1}")
    return None


def train_step(run: Run, batches: Sequence[Sequence[Tensor]]) -> StepStats:
    """One optimizer step over `batches` (gradient accumulation): zero grads, then per micro-batch
    forward + loss + backward, then clip the gradient norm and step. Raises `TrainingDiverged`
    before the weights change if the loss or the gradient norm is not finite. The loss is the mean
    over the step's target tokens (`Objective.count`, over all ranks; DPO's: its pairs); a
    micro-batch with none is skipped. A batch is (inputs, targets) or, for DPO, (inputs, targets,
    reference log-probs)."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
               total_steps=run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=run.device)
    world = run.dist.world_size
    # on the host, before the device copies
    counts = [run.objective.count([batch]) for batch in batches]
    # The step's targets (DPO: pairs) and input tokens, over all ranks (gpt.training.distributed).
    targets, tokens = run.dist.sum([sum(counts), sum(batch[0].numel() for batch in batches)])
    for i, (batch, counted) in enumerate(zip(batches, counts, strict=True)):
        # nothing to learn (a 0/0 mean loss); never under torchrun: a record has targets
        if counted == 0:
            continue
        # this micro-batch's part of the step, with DDP's average
        share = targets / (counted * world)
        tensors = [t.to(run.device, non_blocking=True) for t in batch]
        with autocast(run.device, run.dtype), run.dist.grad_sync(last=i == len(batches) - 1):
            # Its mean loss divided by its share: the gradients add up to those of the step's mean.
            # Divided, so that equal shares (pretraining, one process) divide by exactly
            # len(batches).
            loss = run.loss(*tensors, chunk_size=cfg.loss_chunk) / share
            run.scaler.scale(loss).backward()
        total_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # clip (and report) the true gradient, not the scaled one
    grad_norm = run.dist.clip_grad_norm(run.model, cfg.grad_clip or math.inf)
    total_loss = run.dist.mean(total_loss)  # over all ranks' batches
    # one sync
    loss_value, norm_value = torch.stack([total_loss, grad_norm.to(total_loss)]).tolist()
    # With float16 an infinite gradient is routine: the scaler skips that step and lowers its scale.
    skipped = run.scaler.is_enabled() and not math.isfinite(norm_value)
    checks = [("loss", loss_value)] + ([] if run.scaler.is_enabled() else [("gradient norm",
                                                                            norm_value)])
    check_finite(run, checks, f"at step {state.step + 1}: training stopped before that step "
                              f"changed the "
                 "weights")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    state.step += 1
    state.tokens_seen += tokens
    if skipped:
        tqdm.write(skipped_step_note(run.scaler, state.step))
    return StepStats(loss_value, norm_value, lr, tokens)


# ---- evaluation: measure, keep score, log, save -------------------------------------------------


def evaluate_and_save(run: Run, stats: StepStats | None = None,
                      tokens_per_s: float = math.nan) -> dict[str, float]:
    """One evaluation: measure the losses, keep score for early stopping, log, save the checkpoints.

    `stats` is the step just taken (None before the first). Returns the metrics row it logged. The
    row goes to metrics.csv before the checkpoints are saved: a kill in between leaves a row that
    the resumed run drops and logs again, never a checkpoint without its row.
    """
    state = run.state
    losses = run.objective.evaluate(run)
    for task in run.tasks:  # the same records every time: the column moves with the model only
        losses[task.column] = task_accuracy(run.model, task, dtype=run.dtype, rank=run.dist.rank,
                                            world_size=run.dist.world_size,
                                            all_reduce=run.dist.sum_values)
    check_finite(run, [("training loss", losses["train_loss"]), ("validation loss",
                                                                 losses["val_loss"])],
                 f"at the evaluation of step {state.step}: these weights are not saved")
    # An evaluation the objective keeps out of best/ scores as no improvement (an infinite loss).
    eligible = may_be_best(run.objective, run, losses)
    improved = state.keep_score(losses["val_loss"] if eligible else math.inf, run.cfg.min_delta)
    values = {"step": state.step, "epoch": state.tokens_seen / run.tokens_per_epoch,
              "tokens_seen": state.tokens_seen, **losses, "lr": stats.lr if stats else math.nan,
              "grad_norm": stats.grad_norm if stats else math.nan, "tokens_per_s": tokens_per_s}
    row = {column: values[column] for column in run.metrics.columns}
    if run.dist.is_main:  # rank 0 alone prints and writes
        log_evaluation(run, row, improved)
    cfg = run.cfg
    ends = state.step >= run.total_steps or 0 < cfg.patience <= state.evals_since_best
    every = (state.step // cfg.eval_freq) % cfg.save_freq == 0
    save_checkpoints(run, last=ends or every, best=improved, final=ends)
    return row


def check_finite(run: Run, values: list[tuple[str, float]], when: str) -> None:
    """Raise `TrainingDiverged` if one of the named `values` is not finite, naming the checkpoints
    that are good: last/ is only ever saved after an evaluation whose losses were finite."""
    for what, value in values:
        if not math.isfinite(value):
            last, best, step = run.run_dir / "last", run.run_dir / "best", run.state.best_step
            saved = (f"{last} holds the last checkpoint with finite losses and {best} the best "
                     f"(step {step}): resume one (--resume {best}) with a lower --lr"
                     if math.isfinite(run.state.best_val_loss) else
                     "no checkpoint was saved: start again with a lower --lr")
            raise TrainingDiverged(f"the {what} is {value} {when}; {saved}, keep --grad-clip on, "
                                   f"or use "
                                   "--dtype float32")


def save_checkpoints(run: Run, *, last: bool, best: bool, final: bool = False) -> None:
    """Save last/ and/or best/, as asked, from one checkpoint state (`gpt.training.resume`) through
    `run.saver`, or under FSDP by every rank (`gpt.training.sharded_checkpoint`; `final`: the run
    ends). Each directory is written atomically (gpt/checkpoints/checkpoint.py): a kill at any
    moment leaves the previous one whole. best/ comes first: the best a checkpoint's state names is
    on disk (`gpt.training.resume.settle_best`)."""
    directories = [run.run_dir / name for name, wanted in (("best", best), ("last", last))
                   if wanted]
    state = checkpoint_state(cfg=run.cfg, state=run.state, optimizer=run.optimizer,
                             scaler=run.scaler,
                             sampler=run.sampler, num_windows=len(run.windows), device=run.device)
    if run.lora is not None:  # the adapters' settings and base, beside the adapters (lora.json)
        state["lora"] = run.lora
    if run.dist.sharded:  # every rank writes its shards
        save_sharded(run.model, run.optimizer, state, directories, run.dist, final=final)
    elif run.dist.add_rank_state(state):  # rank 0 writes for all: every rank holds the same weights
        lean = [run.run_dir / "best"] if run.cfg.best_weights_only else []
        run.saver.save(run.model, state, directories, without_optimizer=lean)
    run.last_saved = run.state.step if last else run.last_saved
