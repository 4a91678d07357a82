"""Training settings: `TrainConfig`, each setting a field with a docstring under it, checked when
it is built.

`gpt.training.flags` turns each field into a flag (`batch_size` -> `--batch-size`) whose `--help`
is that docstring, so the settings, their documentation and their flags cannot drift apart, and
reads TOML files of the same names. `gpt.cli.train` puts the sources together (defaults < resumed
run < TOML file < flags) and trains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast, get_args, get_origin, get_type_hints

from gpt.base.device import DTYPES
from gpt.data.records import is_record_file
from gpt.data.token_cache import ERRORS_MODES
from gpt.eval.tasks import parse_task_spec
from gpt.model.config import ConfigError, check_known_fields, preset_names
from gpt.model.lora import DEFAULT_TARGETS, LoRASettings, parse_targets
from gpt.training.tb import require_tensorboard

MODEL_OVERRIDES = ("n_layers", "emb_dim", "n_heads", "drop_rate", "vocab_pad_multiple",
                   "tie_embeddings",
                   "qkv_bias", "init_scheme")
"""The settings that replace a field of the model's `GPTConfig` (its preset's, or its weights')."""
PARALLEL_MODES = ("ddp", "fsdp")
"""The values of --parallel (see `gpt.training.distributed`)."""
RENAMED = {"errors": "decode_errors"}
"""Old setting name -> new one: saved runs and TOML files that use an old name still load, and the
old flag stays an alias of the new one."""
SEED_LIMIT = 2**32
"""--seed is in [0, SEED_LIMIT): what numpy's global generator takes
(`gpt.base.rng.seed_everything`)."""
RUN_CONFIG_FILE = "train_config.json"
"""A run directory's record of its settings (`TrainConfig.to_dict`), written when the run starts."""


def flag(name: str) -> str:
    """The command-line flag of setting `name`: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def need_setting(settings: object, ok: bool, name: str, what: str, example: Any) -> None:
    """Unless `ok`, a `ConfigError` "--NAME must be WHAT, got VALUE; e.g. --NAME EXAMPLE" for the
    setting `name` of `settings`: the one check message of every setting, `TrainConfig`'s own and
    an objective's (`functools.partial` binds `settings`)."""
    if not ok:
        raise ConfigError(f"{flag(name)} must be {what}, got {getattr(settings, name)!r}; "
                          f"e.g. {flag(name)} {example}")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. `python train.py --help` shows these docstrings."""

    # data
    data: str = "default"
    """Training text: a corpus name (default: Python's help topics, offline; the-verdict;
    tinyshakespeare), a text file, a directory of .txt files, a glob, or hf:NAME[:CONFIG]:SPLIT; or
    a .jsonl/.json file of question/answer or instruction records, to fine-tune on (see the
    README)."""
    val_data: str | None = None
    """Validation text (same forms as --data); without it the last --val-fraction of --data is held
    out."""
    val_fraction: float = 0.1
    """Fraction of --data (its end; of records, the last after a shuffle with --seed) held out for
    validation when --val-data is not given."""
    decode_errors: str = "strict"
    """What decoding the text does with bytes that are not UTF-8: strict (refuse the file) or
    replace (with U+FFFD)."""
    data_dir: str = "data"
    """Where downloaded corpora and token caches are kept."""
    prompt_template: str | None = None
    """Records only (--data FILE.jsonl or .json): how a prompt is laid out before its response:
    alpaca (instruction, input, response headings), plain (the prompt and a space), qa ("Question:
    ...\nAnswer: "), or a string with a {prompt} field and an optional {input} one. Default: alpaca
    for instruction/output records, plain for prompt/response and prompt/completion, qa for
    question/answer records and pairs. Kept with the run, so generate.py applies it."""
    mask_prompt: bool = True
    """Records only: train on the response tokens alone (targets of prompt tokens are -100);
    --no-mask-prompt trains on the prompt too."""

    # model
    preset: str = "mini"
    """Model size for --init scratch: mini (4 layers, 256 wide, 4 heads, context 256), tiny,
    gpt2-small/medium/large/xl (alias gpt2)."""
    init: str = "scratch"
    """scratch (random weights of --preset), or GPT-2 weights to start from: gpt2, gpt2-medium, ...,
    a Hugging Face directory or file, or a checkpoint directory of an earlier run
    (runs/NAME/best)."""
    n_layers: int | None = None
    """Transformer blocks (overrides the preset)."""
    emb_dim: int | None = None
    """Embedding width (overrides the preset)."""
    n_heads: int | None = None
    """Attention heads; must divide --emb-dim (overrides the preset)."""
    drop_rate: float | None = None
    """Dropout probability (overrides the preset's: 0 for mini, 0.1 for the others)."""
    vocab_pad_multiple: int | None = None
    """Pad the embedding table and LM head to a multiple of this many rows (overrides the preset's:
    64 for mini, 1 for the others); same results, faster matmuls (see BENCHMARKS.md)."""
    tie_embeddings: bool | None = None
    """Share one matrix between the token embedding and the output head, as GPT-2 does (overrides
    the preset's: tied); the book's from-scratch model has its own head (--no-tie-embeddings)."""
    qkv_bias: bool | None = None
    """Give the query/key/value projection a bias, as GPT-2 does (overrides the preset's: none for
    mini and tiny, a bias for GPT-2)."""
    init_scheme: str | None = None
    """Random init of a --init scratch model: gpt2 (N(0, 0.02), residual projections scaled by
    depth; the default) or torch (PyTorch's module defaults, as in the book: embeddings N(0, 1))."""
    context_length: int | None = None
    """Tokens per training window; at most the model's context length, which is also the default
    (256 for mini, 1024 for GPT-2)."""
    stride: int | None = None
    """Distance between the starts of consecutive training windows; default --context-length (no
    overlap). A smaller stride gives more, overlapping windows per epoch."""

    # optimisation
    batch_size: int = 8
    """Windows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step (effective batch = batch_size x
    this)."""
    epochs: int = 3
    """Passes over the training windows."""
    max_steps: int = 0
    """Stop after this many optimizer steps even if epochs remain (the LR schedule ends there too);
    0 = no limit, train all --epochs."""
    lr: float = 2e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay (the floor)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from ~0 to --lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices (embeddings included) but not to biases or
    LayerNorms."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    adam_betas: str = "0.9,0.95"
    """AdamW's B1,B2: the default is GPT-3's and nanoGPT's, whose lower B2 forgets old gradient
    scales faster and keeps steps stable at the high learning rates small models train well at; the
    book uses PyTorch's 0.9,0.999."""

    # evaluation, early stopping, logging
    eval_freq: int = 20
    """Evaluate and log every this many optimizer steps (and at the end)."""
    eval_iters: int = 2
    """Batches of training and of validation data the losses are averaged over at each evaluation
    (spread evenly over each split; the same batches every time)."""
    save_freq: int = 1
    """Write last/ at every this many-th evaluation (1: at each one), and always at the end and on
    Ctrl-C; best/ is written at every improvement. Fewer saves cost less time for a big model, but a
    kill loses more steps."""
    async_save: bool = True
    """Write checkpoints in a background thread from a copy of the weights and optimizer state taken
    at the step, so training goes on meanwhile (the same files, one save at a time; the price is
    memory for the copy: --no-async-save writes while training waits). See BENCHMARKS.md. Under
    --parallel fsdp every rank writes its own shards at the step, whatever this says."""
    best_weights_only: bool = False
    """Keep best/ without the optimizer state (AdamW's two moments, twice the weights' size): its
    weights and a train_state.pt without the optimizer, so it cannot be resumed (last/ can); for
    the disk use, see docs/training.md. Not with --parallel fsdp, whose best/ is its shards."""
    patience: int = 5
    """Stop after this many evaluations without a validation-loss improvement (0 disables)."""
    min_delta: float = 0.0
    """How much lower the validation loss must be than the best so far to count as an improvement.
    """
    sample_prompt: str = "Every effort moves you"
    """Start of the text sampled after each epoch and at the end."""
    sample_tokens: int = 30
    """Tokens to sample after each epoch and at the end (0 disables sampling)."""
    log_scale: bool = False
    """Draw loss.png with a logarithmic loss axis."""
    eval_answers: int = 32
    """Records only: validation records answered greedily at each evaluation for the val_exact_match
    column (0 disables it)."""
    eval_task: tuple[str, ...] = ()
    """Also score a benchmark task at every evaluation, as a metrics.csv column and a panel of
    loss.png: choice:FILE (multiple choice, acc_norm) or last-word:FILE; repeatable (see
    docs/evaluation-tasks.md)."""
    eval_task_limit: int = 200
    """With --eval-task: how many records of each task's file are scored (its first ones, the same
    at every evaluation)."""
    generation_temperature: float = 0.0
    """Records only: the sampling temperature generate.py answers with by default, saved with the
    run as its generation default (Hugging Face's generation_config): 0, greedy, gives the answer
    the run's val_exact_match measures; --temperature at generation time wins."""
    tensorboard: bool = False
    """Also write each evaluation's metrics as TensorBoard event files into the run directory, for
    `tensorboard --logdir runs` (needs pip install -e ".[tb]")."""

    # the training objective (validation losses stay plain cross-entropy, except with dpo and grpo)
    objective: str = "lm"
    """What training minimises: lm (next-token cross-entropy, or one of its variants below), dpo
    (Direct Preference Optimization: --data holds records of a prompt with a chosen and a rejected
    response, and training starts from --init, typically a fine-tuned run; see the README) or grpo
    (reinforcement learning on prompt records against --reward: see docs/grpo.md)."""
    dpo_beta: float = 0.1
    """With --objective dpo: beta, the scale of the implicit reward beta x (log p - log p_ref) of a
    response; a larger beta keeps the model closer to the reference."""
    rpo_alpha: float = 0.0
    """With --objective dpo: add this x the chosen responses' cross-entropy (per token) to the DPO
    loss (RPO; TRL's rpo_alpha). DPO alone may push both responses down, the chosen one too, until
    the model answers nothing well; 1 keeps the chosen answers likely. Default 0: plain DPO, the
    paper's loss (the run warns when the chosen log-probability falls)."""
    reference: str | None = None
    """With --objective dpo, or grpo with --kl-beta: the frozen reference model (same forms as
    --init), of the same shape and vocabulary as the trained one; default the --init weights."""
    label_smoothing: float = 0.0
    """Train against the one-hot target mixed with the uniform distribution by this much, in [0, 1)
    (0 = plain cross-entropy)."""
    focal_gamma: float = 0.0
    """Train with focal loss, each token's loss weighed by (1 - p)^gamma of its probability p
    (0 = plain cross-entropy)."""
    teacher: str | None = None
    """Distil from this model (GPT-2 weights, a Hugging Face directory, a run or checkpoint
    directory) of any size with the student's vocabulary; default none."""
    distill_weight: float = 0.5
    """With --teacher: the loss is (1 - this) x the hard loss + this x T^2 x KL(teacher || student).
    """
    distill_temperature: float = 2.0
    """With --teacher: T, both models' logits are divided by it before their softmax."""
    reward: tuple[str, ...] = ()
    """With --objective grpo: how a completion is scored, repeatable (the rewards are summed): exact
    (equals the record's reference answer), contains (holds it), number (its last number equals the
    reference's), regex:PATTERN (1 when the completion matches), or FILE.py:FUNCTION, a function
    (prompt, completion, record) -> float. Kept with the run: a resumed run scores the same way."""
    group_size: int = 8
    """With --objective grpo: G, the completions sampled per prompt; each one's advantage is its
    reward against its group's (at least 2)."""
    clip_ratio: float = 0.2
    """With --objective grpo: PPO's clip, the ratio p / p_old is kept in [1 - this, 1 + this]; in
    (0, 1)."""
    kl_beta: float = 0.0
    """With --objective grpo: weight of the per-token KL to --reference (the k3 estimator) in the
    loss; 0 loads no reference."""
    rollout_tokens: int = 64
    """With --objective grpo: the most new tokens of a completion (it stops earlier at end-of-text);
    the prompt keeps its last context - this tokens."""
    rollout_temperature: float = 1.0
    """With --objective grpo: the temperature completions are sampled at (above 0)."""
    rollout_top_k: int | None = None
    """With --objective grpo: sample completions from the K most likely tokens only; default all."""
    rollout_top_p: float = 1.0
    """With --objective grpo: sample completions from the nucleus of this probability mass; in (0,
    1]."""
    updates_per_rollout: int = 1
    """With --objective grpo: optimizer steps on each batch of sampled completions (PPO's epochs);
    with 1 the ratio is 1 and the loss is the policy gradient."""
    loss_aggregation: str = "token"
    """With --objective grpo: token (the mean over a micro-batch's completion tokens, as DAPO and
    TRL) or sequence (the mean over completions of each one's token mean, as the GRPO paper)."""
    scale_rewards: str = "group"
    """With --objective grpo: group (advantage = (reward - group mean) / (group std + 1e-4)) or none
    (reward - group mean, as Dr. GRPO)."""

    # fine-tuning big models in less memory (see docs/finetuning.md)
    lora_rank: int = 0
    """LoRA: freeze the --init weights and train low-rank adapters of this rank beside the layers
    --lora-targets names (0: off, train every weight). Checkpoints then hold the adapters and a
    reference to the --init weights; generate.py, evaluate, explain, export and --init read them
    merged."""
    lora_alpha: float = 16.0
    """With --lora-rank R: the adapters' update is scaled by this / R."""
    lora_dropout: float = 0.05
    """With --lora-rank: dropout on the adapters' input, in [0, 1)."""
    lora_targets: str = ",".join(DEFAULT_TARGETS)
    """With --lora-rank: the layers adapted, of attn.qkv (the fused query/key/value projection,
    adapted as one), attn.proj, mlp.fc, mlp.proj, lm_head; default every layer of the blocks."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute its activations in backward:
    less memory for a third more compute; the same losses and gradients (dropout too)."""

    # system
    dtype: str = "auto"
    """Autocast precision: auto (bfloat16 where the hardware has it: CUDA compute capability 8.0+,
    or a CPU with AVX512-BF16/AMX; float16 with a loss scaler on older CUDA GPUs; else float32),
    float32, bfloat16 (Apple GPUs: macOS 14+) or float16 (CUDA only). Weights stay float32 either
    way."""
    compile: bool = False
    """Compile the model with torch.compile (a slow first step; measured no faster on a CPU, see
    BENCHMARKS.md)."""
    loss_chunk: int = 0
    """Run the LM head's matmuls and loss this many positions at a time (0 = the whole batch at
    once). In evaluation only this many positions' logits exist at once; in training the logits'
    gradient (positions x vocabulary, in the compute dtype) exists whole either way (see
    `gpt.model.loss.head_loss`; speed in BENCHMARKS.md)."""
    keep_freed_memory: bool = True
    """Linux: keep freed memory in the process for reuse instead of handing it back to the kernel
    after every step (much faster steps on a CPU, see BENCHMARKS.md; no effect on a GPU's memory).
    A setting of the whole process (glibc's mallopt), not undone when training ends."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N (one of the visible GPUs) or mps."""
    parallel: str = "ddp"
    """How the processes of a `torchrun` launch share the work: ddp (each rank holds the whole model
    and trains on its slice of every global batch) or fsdp (parameters, gradients and optimizer
    state sharded too); ignored by a plain `python train.py`, which is one process."""
    dist_timeout: int = 600
    """Seconds a rank waits for the others in a collective (an all-reduce) before the whole job
    fails: what bounds the wait when a rank died or raised."""
    seed: int = 123
    """Seed of every random number generator (init, dropout, data order)."""
    out: str = "runs"
    """Directory that holds the run directories."""
    run_name: str | None = None
    """Name of this run's directory under --out; default the start time, e.g. 20250101-120000."""

    def __post_init__(self) -> None:
        hints = get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):  # a repeatable setting read from JSON or TOML is a list
            if get_origin(hints[f.name]) is tuple and isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self._check_types()
        need = partial(need_setting, self)

        for name in ("batch_size", "grad_accum", "epochs", "eval_freq", "eval_iters",
                     "dist_timeout",
                     "save_freq", "eval_task_limit"):
            need(getattr(self, name) >= 1, name, "at least 1", getattr(TrainConfig, name))
        for name in ("context_length", "stride", "n_layers", "emb_dim", "n_heads",
                     "vocab_pad_multiple"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "at least 1", 256)
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number", 1e-3)
        need(0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and --lr ({self.lr:g})",
             self.lr / 10)
        for name in ("max_steps", "warmup_steps", "weight_decay", "grad_clip", "patience",
                     "min_delta",
                     "sample_tokens", "loss_chunk", "eval_answers", "generation_temperature"):
            need(getattr(self, name) >= 0, name, "0 or more", getattr(TrainConfig, name))
        need(self.parallel in PARALLEL_MODES, "parallel", f"one of {', '.join(PARALLEL_MODES)}",
             "ddp")
        if self.best_weights_only and self.parallel == "fsdp":
            raise ConfigError("--best-weights-only does not combine with --parallel fsdp (its "
                              "best/ "
                              "holds the optimizer's shards with the weights'); drop one of them")
        need(_betas(self.adam_betas) is not None, "adam_betas", "two numbers in [0, 1) as B1,B2",
             "0.9,0.999")
        need(0 < self.val_fraction < 1, "val_fraction", "between 0 and 1", 0.1)
        need(0 <= self.seed < SEED_LIMIT, "seed", "in [0, 2^32)", 123)
        need(self.drop_rate is None or 0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)", 0.1)
        need(self.decode_errors in ERRORS_MODES, "decode_errors", f"one of "
                                                                  f"{', '.join(ERRORS_MODES)}",
             "replace")
        need(self.dtype == "auto" or self.dtype in DTYPES, "dtype", f"auto or one of "
                                                                    f"{', '.join(DTYPES)}",
             "float32")
        need(self.init != "scratch" or self.preset in preset_names(), "preset",
             f"one of {', '.join(preset_names())}", "mini")
        need(self.prompt_template is None or is_record_file(self.data),
             "prompt_template", "left out for text data (it lays out records: --data FILE.jsonl or "
                                ".json)",
             "qa --data qa.jsonl")
        need(self.val_data is None or is_record_file(self.val_data) == is_record_file(self.data),
             "val_data",
             "of the same kind as --data (records: .jsonl or .json; else text)", "val.jsonl")
        need(self.sample_tokens == 0 or self.sample_prompt != "", "sample_prompt",
             "some text (or use --sample-tokens 0)", '"Every effort moves you"')
        for spec in self.eval_task:  # its records are read when the run is built
            kind, path = parse_task_spec(spec)
            if not path.is_file():
                raise ConfigError(f"--eval-task {spec}: there is no file {path}; give a {kind} "
                                  "file (see docs/evaluation-tasks.md)")
        self._check_lora(need)
        if self.tensorboard:
            require_tensorboard()  # here, so a missing package stops the run before it starts

    def _check_lora(self, need: Callable[[bool, str, str, Any], None]) -> None:
        """The --lora-* settings: in range, and only with --lora-rank, for a run from --init."""
        need(self.lora_rank >= 0, "lora_rank", "0 (off) or more", 8)
        positive = self.lora_alpha > 0 and math.isfinite(self.lora_alpha)
        need(positive, "lora_alpha", "a positive number", 16)
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)", 0.05)
        try:
            parse_targets(self.lora_targets)
        except ValueError as exc:
            raise ConfigError(f"--lora-targets: {exc}; e.g. --lora-targets attn.qkv,mlp.fc") \
                from None
        if self.lora_rank == 0:
            for name in ("lora_alpha", "lora_dropout", "lora_targets"):
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise ConfigError(f"{flag(name)} sets up LoRA's adapters, which --lora-rank "
                                      f"turns on; add --lora-rank 8, or drop {flag(name)}")
            return
        if self.init == "scratch":
            raise ConfigError("--lora-rank adapts trained weights, which --init names; add "
                              "--init (gpt2, runs/NAME/best, ...), or drop --lora-rank to train a "
                              "new model")
        if self.parallel == "fsdp":
            raise ConfigError("--lora-rank with --parallel fsdp: FSDP shards weights, gradients "
                              "and AdamW's state, but a LoRA run's frozen base has neither "
                              "gradients nor AdamW's state, and its checkpoints hold the adapters "
                              "alone; use --parallel ddp")

    @property
    def lora(self) -> LoRASettings:
        """The --lora-* settings, as `gpt.model.lora.add_lora` takes them."""
        return LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout,
                            parse_targets(self.lora_targets))

    @property
    def model_overrides(self) -> dict[str, Any]:
        """The `MODEL_OVERRIDES` that are set, by name: what replaces fields of the model's config.
        """
        return {name: getattr(self, name) for name in MODEL_OVERRIDES if getattr(self,
                                                                                 name) is not None}

    def _check_types(self) -> None:
        """Values from a TOML file or Python are not parsed by argparse: check each field's type."""
        hints = get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), get_args(hints[f.name]) or (hints[f.name],)
            if get_origin(hints[f.name]) is tuple:  # a repeatable setting: tuple[str, ...]
                if not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                    raise ConfigError(f"{flag(f.name)} must be a list of strings, got {value!r}")
                continue
            ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            if float in allowed:  # an integer is a fine float (lr = 1 in TOML)
                ok = ok or (isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                names = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(f"{flag(f.name)} must be {names}, got {value!r}")

    @property
    def betas(self) -> tuple[float, float]:
        """`adam_betas` as the pair AdamW takes."""
        return cast(tuple[float, float], _betas(self.adam_betas))

    def to_dict(self) -> dict[str, Any]:
        """The settings as train_config.json holds them (a repeatable setting as a list)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a TOML file, a saved run); unknown keys are an error, not ignored, and
        old names (`RENAMED`) are read as the new ones."""
        data = current_names(data)
        check_known_fields(data, (f.name for f in dataclasses.fields(cls)), "setting")
        return cls(**data)


def _betas(text: str) -> tuple[float, float] | None:
    """"B1,B2" as two floats in [0, 1), or None if it is not that."""
    try:
        b1, b2 = (float(part) for part in text.split(","))
    except ValueError:  # not a number, or not two of them
        return None
    return (b1, b2) if 0 <= b1 < 1 and 0 <= b2 < 1 else None


def current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with every old name (`RENAMED`) replaced by the current one."""
    renamed = {RENAMED.get(key, key): value for key, value in settings.items()}
    if len(renamed) < len(settings):
        both = next(old for old, new in RENAMED.items() if old in settings and new in settings)
        raise ConfigError(f"{both} and {RENAMED[both]} are the same setting ({both} is its old "
                          f"name); "
                          f"keep only {RENAMED[both]}")
    return renamed
