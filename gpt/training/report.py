"""What a training run reports: its first line, each evaluation's row, the samples, the summary
(rank 0).

Each evaluation's row goes to metrics.csv, TensorBoard (with --tensorboard), loss.png and the
printed line (`log_evaluation`).
"""

from __future__ import annotations

from tqdm import tqdm

from gpt.eval.answers import sample_answer
from gpt.model.sampling import sample_text
from gpt.training.run import Run


def print_sample(run: Run, when: str) -> None:
    """The sample after an epoch and at the end (rank 0): for records, the answer to the first
    validation prompt; for text, `--sample-tokens` tokens after `--sample-prompt`. Under FSDP every
    rank generates it (each forward gathers the shards), the same on each; rank 0 alone prints."""
    if run.cfg.sample_tokens > 0 and (run.dist.is_main or run.dist.sharded):
        records = run.records
        if records is not None:
            text = sample_answer(run.model, records.val_records[0], records.template,
                                 run.cfg.sample_tokens, dtype=run.dtype)
        else:
            text = sample_text(run.model, run.cfg.sample_prompt, run.cfg.sample_tokens,
                               seed=run.cfg.seed, dtype=run.dtype)
        tqdm.write(f"sample {when}: " + text.replace("\n", " "))


def log_evaluation(run: Run, row: dict[str, float], improved: bool) -> None:
    """Append `row` to metrics.csv (and TensorBoard's events), redraw loss.png, print the row as a
    line."""
    run.metrics.append(row)
    if run.tensorboard:
        run.tensorboard.log(int(row["step"]), row)
    run.metrics.plot(run.run_dir / "loss.png", tokens_per_epoch=run.tokens_per_epoch,
                     best_step=run.state.best_step, log_scale=run.cfg.log_scale,
                     title=f"{run.run_dir.name}: {run.model.num_parameters() / 1e6:.1f}M "
                           f"parameters")
    tasks = "".join(f" | {task.column} {row[task.column]:.1%}" for task in run.tasks)
    tqdm.write(run.objective.describe_row(row) + tasks + ("  (best)" if improved else ""))


def print_header(run: Run) -> None:
    """The first line: the model, the device and precision, the data, the steps, the run directory.
    """
    cfg, windows = run.cfg, len(run.windows)
    rows = cfg.batch_size * (run.records.rows_per_example if run.records else 1)
    tokens_per_step = rows * run.dist.world_size * cfg.grad_accum * run.windows.context_length
    data = run.records.describe(windows, run.windows.context_length) if run.records else \
        f"{windows} training windows"
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in run.model.parameters()) - trainable  # a LoRA run's base
    split = f" ({trainable:,} trainable, {frozen / 1e6:.1f}M frozen)" if frozen else ""
    print(f"{run.model.num_parameters() / 1e6:.1f}M parameters{split} on {run.device} "
          f"({str(run.dtype).removeprefix('torch.')}); {data}, {run.total_steps} steps of "
          f"{'up to ' * (run.records is not None)}{tokens_per_step} tokens, step {run.state.step} "
          f"now; run directory {run.run_dir}")


def print_summary(run: Run, stop: str) -> None:
    """Where the best weights are, and why training stopped if it did not run to the end."""
    state = run.state
    print(f"best validation {run.objective.best_line(state.best_val_loss)} at step "
          f"{state.best_step}: weights in {run.run_dir / 'best'}")
    if stop == "early_stop":
        print(f"stopped early at step {state.step}: {run.cfg.patience} evaluations without "
              f"improvement")
    if stop == "interrupted":
        print(f"interrupted at step {state.step}; {run.run_dir / 'last'} is saved; continue with: "
              f"python train.py --resume {run.run_dir}")
