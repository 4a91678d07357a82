"""The training loop, as a few plain functions to read top-down:

    train(cfg)                          setup + fit
      setup(cfg)                        seed, model, data, loaders, optimizer; a resumed run restored
      fit(run)                          an epoch at a time until done, early stopping or Ctrl-C
        _train_epoch(run, progress)     steps over the epoch's batches; says why to stop, if it should
          train_step(run, batches)      zero grads, GPT.loss, backward, clip, check finite, step
          evaluate_and_save(run, ...)   every eval_freq steps (and at the end):
            evaluate(run)                 measure: train and validation loss
            keep_score(state, ...)        keep score for early stopping
            log_evaluation(run, ...)      metrics.csv, the printed line, loss.png
            save_checkpoints(run, ...)    last/, and best/ when the validation loss improved

A run directory `runs/<name>/` holds `train_config.json`, `metrics.csv` (`gpt.metrics`), `loss.png`,
and the checkpoints `last/` (every evaluation) and `best/` (lowest validation loss), each
`model.safetensors` + `config.json` + `train_state.pt` (`gpt.resume`). The settings are
`gpt.train_config.TrainConfig`; the learning rate is a pure function of the step (`lr_at`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from gpt.answers import sample_answer, val_exact_match
from gpt.atomic import write_json
from gpt.checkpoint import load_model, load_train_state, save_checkpoint
from gpt.config import GPTConfig
from gpt.data import ResumableSampler, SlidingWindowDataset, micro_batch_groups
from gpt.device import (
    autocast,
    configure_device,
    flag_fixable_errors,
    keep_freed_memory,
    pick_device,
    skipped_step_note,
    training_dtype,
)
from gpt.errors import TrainingDiverged, UserError
from gpt.loss import count_targets, evaluate_loss, perplexity
from gpt.metrics import ANSWER_COLUMN, METRICS_COLUMNS, METRICS_FILE, MetricsLog, format_row
from gpt.model import GPT
from gpt.optim import build_optimizer, lr_at
from gpt.record_data import BucketBatchSampler, RecordData, run_loaders
from gpt.records import InstructionDataset
from gpt.resume import TrainState, check_resume_settings, checkpoint_state, find_resume_checkpoint, restore
from gpt.sampling import sample_text
from gpt.train_config import MODEL_OVERRIDES, TrainConfig
from gpt.weights import load_pretrained

# ---- the pieces: seeds, model ------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed seeds every GPU too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig) -> GPT:
    """A fresh model: the preset's random init, or published/earlier weights for `--init`."""
    overrides = {name: getattr(cfg, name) for name in MODEL_OVERRIDES if getattr(cfg, name) is not None}
    if cfg.init == "scratch":
        return GPT(GPTConfig.preset(cfg.preset, **overrides))
    return load_pretrained(cfg.init, **overrides)


# ---- setup ------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything `fit` works on, as `setup` built it."""

    cfg: TrainConfig
    run_dir: Path
    model: GPT
    loss: Callable[..., Tensor]
    """What the training steps call: `model.loss`, or with `--compile` `compiled_loss(model)`."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    """Loss scaling for float16 (a no-op when disabled, i.e. for every other dtype)."""
    train_loader: DataLoader[tuple[Tensor, Tensor]]
    eval_loaders: dict[str, DataLoader[tuple[Tensor, Tensor]]]
    """"train" and "val": the same `eval_iters` batches at every evaluation (see `build_loaders`)."""
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    tokens_per_epoch: int
    metrics: MetricsLog
    """metrics.csv: one row per evaluation (loss.png is drawn from it)."""
    state: TrainState = field(default_factory=TrainState)
    records: RecordData | None = None
    """A fine-tuning run's template and validation records (`gpt.record_data`); None for text."""

    @property
    def windows(self) -> SlidingWindowDataset | InstructionDataset:
        """The training windows (or records): the dataset `train_loader` draws from."""
        return cast(SlidingWindowDataset | InstructionDataset, self.train_loader.dataset)

    @property
    def sampler(self) -> ResumableSampler | BucketBatchSampler:
        """`train_loader`'s sampler (of batches, for records), whose position a checkpoint saves."""
        batches, windows = self.train_loader.batch_sampler, self.train_loader.sampler
        return batches if isinstance(batches, BucketBatchSampler) else cast(ResumableSampler, windows)


def setup(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> Run:
    """Build the run: seed, model, data, loaders, optimizer, run directory.

    `resume` (a run directory, or a checkpoint directory in one) continues a run where that checkpoint
    was taken; `cfg` must then agree with the run's settings on `RESUME_FIXED` (see `gpt.resume`).
    `token_ids` = (train, val) arrays replace `prepare_data(cfg.data, ...)`. Every check comes before
    the run directory is written to.
    """
    checkpoint: Path | None = None  # the checkpoint resumed from, and its training state
    saved: dict[str, Any] = {}
    if resume is not None:
        checkpoint = find_resume_checkpoint(Path(resume))
        saved = load_train_state(checkpoint)
        check_resume_settings(cfg, saved, checkpoint)
        run_dir = checkpoint.parent
    else:
        run_dir = choose_run_dir(cfg)
    cfg = dataclasses.replace(cfg, out=str(run_dir.parent), run_name=run_dir.name)
    device = pick_device(cfg.device)
    configure_device(device)
    dtype = training_dtype(cfg.dtype, device)
    if cfg.keep_freed_memory:
        keep_freed_memory()

    seed_everything(cfg.seed)
    model = load_model(checkpoint, device) if checkpoint else build_model(cfg).to(device)
    model.train()
    model_context = model.config.context_length
    context_length = cfg.context_length or model_context
    if context_length > model_context:
        raise UserError(f"--context-length {context_length} exceeds the model's context length "
                        f"{model_context}; use --context-length {model_context} or less")

    train_loader, eval_loaders, records = run_loaders(cfg, context_length, token_ids,
                                                      pin_memory=device.type == "cuda")
    if records is not None:  # fine-tuning on records: the template is kept with the run
        cfg = dataclasses.replace(cfg, prompt_template=records.template)
    batches_per_epoch = len(train_loader)  # whole batches (drop_last); the sampler is at its start

    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(batches_per_epoch / cfg.grad_accum) * cfg.epochs
    run = Run(
        cfg=cfg, run_dir=run_dir, model=model,
        loss=compiled_loss(model) if cfg.compile else model.loss,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        train_loader=train_loader, eval_loaders=eval_loaders, device=device, dtype=dtype,
        total_steps=min(steps, cfg.max_steps or steps),
        tokens_per_epoch=records.tokens_per_epoch if records else batches_per_epoch * cfg.batch_size
        * context_length,
        metrics=MetricsLog(run_dir / METRICS_FILE, METRICS_COLUMNS + (
            (ANSWER_COLUMN,) if records is not None and cfg.eval_answers else ())),
        records=records,
    )
    if checkpoint is not None:  # restore also sets the random generators: nothing below draws from them
        run.state = restore(saved, checkpoint, optimizer=optimizer, scaler=run.scaler, sampler=run.sampler,
                            num_windows=len(run.windows), device=device)
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # a changed --weight-decay wins
        run.metrics.truncate(up_to_step=run.state.step)  # those steps are taken again, and log again
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "train_config.json", cfg.to_dict())
    return run


def compiled_loss(model: GPT) -> Callable[..., Tensor]:
    """`model.loss` with the transformer compiled and the head's loss run as written: the chunked
    path fills its buffers in place, and compiling it too would be a new speed option to measure."""
    body = torch.compile(model.hidden_states)
    return lambda idx, targets, *, chunk_size=0: model.head_loss(body(idx), targets, chunk_size=chunk_size)


def choose_run_dir(cfg: TrainConfig) -> Path:
    """`out/run_name` (default name: the start time), which must not hold a run already; creates nothing."""
    run_dir = Path(cfg.out) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick "
                        "another --run-name")
    return run_dir


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
    tokens: int = 0  # trained on since the last evaluation, and in seconds of steps (not evaluating):
    seconds: float = 0.0  # the tokens/s of the next metrics row


def train(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train a GPT as `cfg` says (see `setup` for `resume` and `token_ids`). Out of memory and a failed
    `--compile` end in a one-line `UserError` naming the flags that fix them."""
    with flag_fixable_errors("lower --batch-size (raising --grad-accum keeps the step's tokens), or set "
                             "--loss-chunk, or use --dtype bfloat16"):
        return fit(setup(cfg, resume=resume, token_ids=token_ids))


def fit(run: Run) -> TrainResult:
    """Train until all steps are done, early stopping fires, or Ctrl-C; see the module docstring."""
    state = run.state
    _print_header(run)
    logged = run.metrics.rows()  # a resumed run's, up to its checkpoint
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", disable=None, dynamic_ncols=True)
    with bar, ctrl_c_flag() as interrupted:
        progress = _Progress(bar, interrupted, val_loss=logged[-1]["val_loss"] if logged else math.nan)
        if state.step == 0:  # the untrained model's losses: where the curves start
            progress.val_loss = evaluate_and_save(run)["val_loss"]
        stop = None
        while stop is None:
            stop = _train_epoch(run, progress)
    if stop != "interrupted":
        _print_sample(run, "at the end")
    best = state.best_val_loss
    print(f"best validation loss {best:.4f} (perplexity {perplexity(best):.1f}) at step {state.best_step}: "
          f"weights in {run.run_dir / 'best'}")
    if stop == "early_stop":
        print(f"stopped early at step {state.step}: {run.cfg.patience} evaluations without improvement")
    if stop == "interrupted":
        print(f"interrupted at step {state.step}; {run.run_dir / 'last'} is saved; continue with: "
              f"python train.py --resume {run.run_dir}")
    return TrainResult(run.run_dir, stop, state.step, state.best_step, best, progress.step_losses)


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
        if progress.interrupted():
            if not evaluated:  # last/ is older than this step
                save_checkpoints(run, best=False)
            return "interrupted"
    _print_sample(run, f"after epoch {epoch + 1}")
    return None


def train_step(run: Run, batches: list[tuple[Tensor, Tensor]], step_targets: int | None = None) -> StepStats:
    """One optimizer step over `batches` (gradient accumulation): zero grads, then per micro-batch
    forward + loss + backward, then clip the gradient norm and step. Raises `TrainingDiverged`
    before the weights change if the loss or the gradient norm is not finite. The loss is the mean over
    the step's `step_targets` (default `count_targets(batches)`); a micro-batch with none is skipped."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
               total_steps=run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=run.device)
    tokens = 0
    step_targets = count_targets(batches) if step_targets is None else step_targets
    for x, y in batches:
        tokens += x.numel()
        counted = count_targets([(x, y)])
        if counted == 0:  # nothing to learn from here (and its mean loss would be 0/0)
            continue
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with autocast(run.device, run.dtype):
            # Its mean loss times its share of the step's targets: the gradients add up to the step's
            # mean. Divided, so that equal shares (pretraining) divide by exactly len(batches).
            loss = run.loss(x, y, chunk_size=cfg.loss_chunk) / (step_targets / counted)
        run.scaler.scale(loss).backward()
        total_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # clip (and report) the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    loss_value, norm_value = torch.stack([total_loss, grad_norm.to(total_loss)]).tolist()  # one sync
    # With float16 an infinite gradient is routine: the scaler skips that step and lowers its scale.
    skipped = run.scaler.is_enabled() and not math.isfinite(norm_value)
    checks = [("loss", loss_value)] + ([] if run.scaler.is_enabled() else [("gradient norm", norm_value)])
    for what, value in checks:
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the {what} is {value} at step {state.step + 1}: training stopped before that step "
                f"changed the weights, and {run.run_dir / 'last'} holds the last good checkpoint; "
                "lower --lr, keep --grad-clip on, or use --dtype float32")
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
    train_loss, val_loss = evaluate(run)
    improved = keep_score(state, val_loss, run.cfg.min_delta)
    row = {"step": state.step, "epoch": state.tokens_seen / run.tokens_per_epoch,
           "tokens_seen": state.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
           "val_perplexity": perplexity(val_loss), "lr": stats.lr if stats else math.nan,
           "grad_norm": stats.grad_norm if stats else math.nan, "tokens_per_s": tokens_per_s}
    if ANSWER_COLUMN in run.metrics.columns and run.records is not None:
        row[ANSWER_COLUMN] = val_exact_match(run.model, run.records.val_records, run.records.template,
                                             limit=run.cfg.eval_answers, dtype=run.dtype)
    log_evaluation(run, row, improved)
    save_checkpoints(run, best=improved)
    return row


def evaluate(run: Run) -> tuple[float, float]:
    """(train, validation) loss, each averaged over its `eval_iters` evaluation batches."""
    train_loss, val_loss = (evaluate_loss(run.model, run.eval_loaders[name], dtype=run.dtype,
                                          chunk_size=run.cfg.loss_chunk) for name in ("train", "val"))
    return train_loss, val_loss


def keep_score(state: TrainState, val_loss: float, min_delta: float) -> bool:
    """Count an evaluation for early stopping; True if `val_loss` is a new best (by more than
    `min_delta`), which resets the count of evaluations without one."""
    improved = val_loss < state.best_val_loss - min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
    else:
        state.evals_since_best += 1
    return improved


def log_evaluation(run: Run, row: dict[str, float], improved: bool) -> None:
    """Append `row` to metrics.csv, redraw loss.png from it, print the row as a line."""
    run.metrics.append(row)
    run.metrics.plot(run.run_dir / "loss.png", tokens_per_epoch=run.tokens_per_epoch,
                     best_step=run.state.best_step, log_scale=run.cfg.log_scale,
                     title=f"{run.run_dir.name}: {run.model.num_parameters() / 1e6:.1f}M parameters")
    tqdm.write(format_row(row) + ("  (best)" if improved else ""))


def save_checkpoints(run: Run, *, best: bool) -> None:
    """Save last/, and best/ too when `best`, from one checkpoint state (`gpt.resume`).

    Each directory is written atomically (see gpt/checkpoint.py), so a kill at any moment leaves the
    previous one whole.
    """
    state = checkpoint_state(cfg=run.cfg, state=run.state, optimizer=run.optimizer, scaler=run.scaler,
                             sampler=run.sampler, num_windows=len(run.windows), device=run.device)
    save_checkpoint(run.model, state, run.run_dir / "last")
    if best:
        save_checkpoint(run.model, state, run.run_dir / "best")


# ---- samples, the header line, Ctrl-C ---------------------------------------------------------


def _print_sample(run: Run, when: str) -> None:
    if run.cfg.sample_tokens > 0:  # for records: the answer to the first validation prompt
        text = sample_answer(run.model, run.records, run.cfg.sample_tokens, dtype=run.dtype) if run.records \
            else sample_text(run.model, run.cfg.sample_prompt, run.cfg.sample_tokens, seed=run.cfg.seed,
                             dtype=run.dtype)
        tqdm.write(f"sample {when}: " + text.replace("\n", " "))


def _print_header(run: Run) -> None:
    cfg, windows = run.cfg, len(run.windows)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.windows.context_length
    data = run.records.describe(windows, run.windows.context_length) if run.records else \
        f"{windows} training windows"
    print(f"{run.model.num_parameters() / 1e6:.1f}M parameters on {run.device} "
          f"({str(run.dtype).removeprefix('torch.')}); {data}, "
          f"{run.total_steps} steps of {'up to ' * (run.records is not None)}{tokens_per_step} tokens, "
          f"step {run.state.step} now; "
          f"run directory {run.run_dir}")


@contextlib.contextmanager
def ctrl_c_flag() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop reads between steps; the second interrupts at once.

    Stopping between steps, never inside one, is what makes the checkpoint saved after a Ctrl-C
    consistent: no half-accumulated gradients, no half-updated optimizer. Yields `interrupted()`.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield pressed.is_set
        return

    def handler(signum: int, frame: object) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()
        tqdm.write("Ctrl-C: stopping after this step and saving last/ (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
