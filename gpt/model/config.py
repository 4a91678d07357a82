"""Model configuration: one dataclass and the named presets.

The field names follow Raschka's book (`emb_dim`, `n_heads`, ...); the presets are the four
published GPT-2 sizes plus small models that train on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.base.errors import UserError, describe, past_json_limits

GPT2_VOCAB_SIZE = 50257
MAX_PARAMETERS = 2**40
"""The largest model a config may describe: ~1.1e12 parameters, 4.4 TB of float32 weights, 700 times
GPT-2 XL. A bigger shape is a typo (emb_dim 10**9), refused before anything is allocated."""
INIT_SCHEMES = ("gpt2", "torch")


class ConfigError(UserError):
    """An impossible or unreadable configuration (a `UserError`, hence also a `ValueError`)."""


def check_known_fields(names: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise `ConfigError` if `names` (e.g. a dict's keys) holds one not in `known`.

    A misspelt setting is an error, never silently dropped. `what` names one entry in the message:
    `unknown {what}(s) a, b; known: x, y, z`.
    """
    known = list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file `path`; `ConfigError` (one line) if it cannot be read, is not
    JSON, or holds something else. `what` says what the file should hold, e.g. "a model config"."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({describe(exc)}); it should hold {what}") from None
    except (RecursionError, ValueError) as exc:  # past Python's limits: no config goes there
        raise ConfigError(f"cannot read {path} ({past_json_limits(exc)}); it should hold "
                          f"{what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; it should "
                          f"hold {what}")
    return data


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = GPT2_VOCAB_SIZE
    """Number of token ids the model reads and predicts (GPT-2 BPE: 50257)."""

    context_length: int = 1024
    """Longest sequence the model accepts; the size of the learned position-embedding table."""

    emb_dim: int = 768
    """Width of the residual stream (d_model)."""

    n_heads: int = 12
    """Attention heads per layer; `emb_dim` must be divisible by it (head size = emb_dim / n_heads).
    """

    n_layers: int = 12
    """Number of transformer blocks."""

    drop_rate: float = 0.1
    """Dropout probability on embeddings, attention weights and both residual branches (0 disables).
    """

    qkv_bias: bool = True
    """Whether the fused query/key/value projection has a bias (GPT-2: yes; the book trains
    without)."""

    tie_embeddings: bool = True
    """Whether the LM head shares its weight tensor with the token embedding (GPT-2: yes)."""

    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (GPT-2 uses 1e-5)."""

    init_scheme: str = "gpt2"
    """How a new model's weights are drawn: gpt2 (N(0, 0.02), the residual projections scaled down
    by depth) or torch (each PyTorch module's own default, as the book's code gets them: embeddings
    N(0, 1), linear layers uniform). Only construction reads it: loaded weights replace either."""

    vocab_pad_multiple: int = 1
    """Round the token-embedding table and the LM head up to a multiple of this many rows (64:
    50257 -> 50304), for matmul shapes that run faster. The extra rows are never looked up and
    their logits are dropped, so the model computes exactly what it would without them."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                     "vocab_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("drop_rate", "layer_norm_eps"):  # a number: not a string, None or a bool
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value,
                                                                 bool) or not math.isfinite(value):
                raise ConfigError(f"GPTConfig.{name} must be a finite number, got {value!r}")
        for name in ("qkv_bias", "tie_embeddings"):  # JSON's true or false: "no" is not false
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ConfigError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads "
                f"({self.n_heads}); "
                f"pick n_heads from {_divisors(self.emb_dim)}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ConfigError(f"GPTConfig.init_scheme must be one of {', '.join(INIT_SCHEMES)}, "
                              f"got {self.init_scheme!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.parameter_estimate() > MAX_PARAMETERS:
            raise ConfigError(
                f"GPTConfig describes a model of about {self.parameter_estimate():.2g} parameters "
                f"({4 * self.parameter_estimate() / 1e12:.2g} TB in float32; emb_dim "
                f"{self.emb_dim}, "
                f"n_layers {self.n_layers}, vocab_size {self.vocab_size}, context_length "
                f"{self.context_length}), more than any machine holds (at most "
                f"{MAX_PARAMETERS:.2g} "
                "here); make it smaller")

    def parameter_estimate(self) -> int:
        """The parameters a model of this shape holds, padding rows included (what `GPT` allocates),
        from the shape alone: for refusing an absurd one before memory is asked for it."""
        width, blocks, rows = self.emb_dim, self.n_layers, self.padded_vocab_size
        per_block = 12 * width * width + (13 if self.qkv_bias else 10) * width
        return rows * width * (1 if self.tie_embeddings else 2) + self.context_length * width + \
            blocks * per_block + 2 * width

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token-embedding table and the LM head: `vocab_size` rounded up."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration, optionally with some fields replaced (`preset("gpt2",
        drop_rate=0)`)."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: "
                              f"{', '.join(preset_names())}")
        return PRESETS[key].replace(**overrides)

    def replace(self, **overrides: Any) -> GPTConfig:
        """A copy with some fields changed (an unknown name is an error; checked by
        `__post_init__`)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict such as `config.json`; unknown keys are an error, not silently dropped.
        """
        check_known_fields(data, (f.name for f in dataclasses.fields(cls)), "GPTConfig field")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> GPTConfig:
        """The config in the JSON file `path`; a `ConfigError` that names the file if it is not one.
        """
        data = read_json_object(path, "a model config (GPTConfig fields)")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path} is not a valid model config: {exc}") from None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


PRESETS: dict[str, GPTConfig] = {
    # The four sizes OpenAI released; parameter counts are with the tied head counted once.
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
    # The default of `python train.py`: 16M parameters (13M of them the embedding), small enough to
    # train on the built-in corpus on a laptop CPU in minutes. No qkv bias, as in the book's
    # from-scratch run. No dropout: over the default run's few epochs it only slowed learning, and
    # it costs step time; the vocabulary is padded for faster matmul shapes (both: BENCHMARKS.md).
    "mini": GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0,
                      qkv_bias=False, vocab_pad_multiple=64),
    # For tests and smoke runs: seconds, not minutes.
    "tiny": GPTConfig(context_length=128, emb_dim=64, n_heads=2, n_layers=2, qkv_bias=False),
}

PRESET_ALIASES: dict[str, str] = {"gpt2": "gpt2-small", "gpt2-124m": "gpt2-small"}


def preset_names() -> list[str]:
    """Every accepted preset name, aliases included."""
    return [*PRESETS, *PRESET_ALIASES]
