"""LoRA: low-rank adapters beside the model's linear layers, the base frozen (Hu et al. 2021).

A linear layer y = x Wᵀ + b of a trained model is adapted by a low-rank update of its weight:

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ        A (r, in), B (out, r), r << in, out

W and b stay frozen (`requires_grad=False`: no gradient, no optimizer state); only A and B train.
B starts at zero, so an adapted model computes exactly what its base computes until the first step.
alpha / r scales the update, so that a run keeps its learning rate when it changes r.

`LoRALinear` holds the layer's own `weight` and `bias` Parameters (the same tensors, so a tied head
stays tied) and its adapter as `lora_A` and `lora_B`: the base's weight names are unchanged
(`blocks.0.attn.qkv.weight`), the adapters' are beside them (`blocks.0.attn.qkv.lora_A`).

`--lora-targets` names the layers by their place in a block (`TARGETS`). `attn.qkv` is the fused
query/key/value projection of `gpt.model.model.CausalSelfAttention`, adapted as one layer: one A
for its input and one B of 3 x emb_dim rows, so q, k and v share the adapter's r input directions.
It has as many parameters (4 x emb_dim x r) as the LoRA paper's separate q and v adapters of the
same rank. The default (`DEFAULT_TARGETS`) adapts every linear layer of the blocks: QLoRA (Dettmers
et al. 2023) found that adapters on all of them are needed to match full fine-tuning, and with
r = 8 they are still under 1% of GPT-2's parameters. The LM head is left out by default: it is
tied to the token embedding and is the largest matrix (a vocabulary of rows), and adapted it
computes the whole logits instead of the fused head loss (`gpt.model.loss.head_loss`).

`merge_lora(model)` folds each adapter into its weight, W + (alpha / r) B A, and puts plain
`nn.Linear` layers back: the model then computes the same without the adapters' matmuls and saves
and exports as any model. `adapters_off(model)` switches the adapters off for a while: the base
model again, with no second copy of it (DPO's reference).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.base.errors import UserError
from gpt.model.model import GPT, Dropout

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head")
"""The linear layers an adapter may sit beside: in each block the fused q/k/v projection, the
attention's output projection, the MLP's expansion and its projection back; and the LM head."""
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
"""Every linear layer of the blocks, the head left out (see the module docstring)."""
ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRASettings:
    """What adapts a model: the rank r, alpha (the update is scaled by alpha / r), the dropout on
    the adapters' input, and the layers adapted (names of `TARGETS`)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def parse_targets(text: str) -> tuple[str, ...]:
    """`--lora-targets` ("attn.qkv,mlp.fc") as target names; `ValueError` naming the choices for an
    unknown, repeated or missing one."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in TARGETS]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown target {unknown[0]!r}" if unknown else "a target named twice"
        raise ValueError(f"{problem}; choose from {','.join(TARGETS)}")
    return names


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter beside it (see the module docstring).

    `weight` and `bias` are the adapted `nn.Linear`'s own Parameters (not copies); `lora_A` starts
    as `nn.Linear` starts its weight (Kaiming-uniform, as the LoRA paper's code does), `lora_B`
    at 0.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.lora_A = nn.Parameter(linear.weight.new_empty(rank, self.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(linear.weight.new_zeros(self.out_features, rank))
        self.alpha = alpha
        self.lora_dropout = Dropout(dropout)
        self.adapter_on = True
        """False inside `adapters_off`: the layer is its base alone."""

    @property
    def rank(self) -> int:
        return self.lora_A.size(0)

    @property
    def scale(self) -> float:
        """alpha / r, the factor of the adapter's update."""
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return y
        # (x A^T) B^T, never B A: two thin matmuls instead of an (out, in) matrix every step. The
        # scale goes on the r-wide x A^T, and y + (.) B^T is one addmm: no extra pass over y.
        h = F.linear(self.lora_dropout(x), self.lora_A) * self.scale  # (..., r)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_B.t()).view(y.shape)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` of weight W + (alpha / r) B A (a new tensor: W itself is left alone,
        since a tied head's W is also the token embedding) and the same bias Parameter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype),
                                         requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


def target_layers(model: GPT, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, parent module, attribute) of each layer `targets` names, in the model's order:
    `blocks.{i}.attn.qkv`, ..., then `lm_head`."""
    for i, block in enumerate(model.blocks):
        for target in (t for t in TARGETS if t in targets and t != "lm_head"):
            part, attribute = target.split(".")
            yield f"blocks.{i}.{target}", getattr(block, part), attribute
    if "lm_head" in targets:
        yield "lm_head", model, "lm_head"


def add_lora(model: GPT, settings: LoRASettings) -> GPT:
    """Freeze every parameter of `model` and put an adapter (`LoRALinear`) beside each layer
    `settings.targets` names, in place; returns `model`. Only the adapters then require gradients.

    A rank larger than a layer's smaller side is refused (a `UserError`): such an update is no
    longer low-rank, and B A could not be more than that side's rank anyway.
    """
    layers = list(target_layers(model, settings.targets))
    for name, parent, attribute in layers:
        linear = getattr(parent, attribute)
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{name} is a {type(linear).__name__}, not a plain linear layer: its "
                            "model has adapters already (merge them with merge_lora first)")
        side = min(linear.in_features, linear.out_features)
        if settings.rank > side:
            raise UserError(f"--lora-rank {settings.rank} is larger than {name}, a "
                            f"{linear.out_features} x {linear.in_features} layer; use --lora-rank "
                            f"{side} or less")
    model.requires_grad_(False)
    for _, parent, attribute in layers:
        linear = getattr(parent, attribute)
        adapted = LoRALinear(linear, settings.rank, settings.alpha, settings.dropout)
        setattr(parent, attribute, adapted.train(linear.training))  # in the model's mode
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """The model's adapted layers, in its order."""
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    """Whether `model` has LoRA adapters."""
    return bool(lora_layers(model))


def lora_settings(model: GPT) -> LoRASettings | None:
    """The settings `add_lora` adapted `model` with, read from its layers; None without adapters."""
    names = {name.rsplit(".", 1)[0] for name, _ in adapter_state(model).items()}
    if not names:
        return None
    first = lora_layers(model)[0]
    targets = tuple(t for t in TARGETS if any(n == t or n.endswith("." + t) for n in names))
    return LoRASettings(first.rank, first.alpha, first.lora_dropout.p, targets)


def is_adapter_name(name: str) -> bool:
    """Whether a state-dict name is an adapter's (`blocks.0.attn.qkv.lora_A`)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors by state-dict name ({} for a model without adapters): what a LoRA
    checkpoint stores instead of the weights."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_name(name)}


def is_adapter_state(tensors: Mapping[str, Tensor]) -> bool:
    """Whether `tensors` are adapters alone (`adapter_state`'s), not a model's weights."""
    return bool(tensors) and all(is_adapter_name(name) for name in tensors)


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight (W + (alpha / r) B A) and put a plain `nn.Linear`
    back in its place, in place; returns `model`, which then computes what it computed with the
    adapters (within float32 rounding) and is what a model that never had any is: the same weight
    names, and every parameter trainable again.

    An adapted head tied to the token embedding gets a weight of its own: merging the update into
    the shared tensor would change the embedding too. The config then says `tie_embeddings=False`.
    """
    for module in list(model.modules()):
        for attribute, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attribute, child.merged())
    if model.config.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.config = model.config.replace(tie_embeddings=False)
    return model.requires_grad_(True)  # as a model that never had adapters: every weight trainable


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside the block every adapter is switched off: `model` computes what its base computes."""
    layers = [(layer, layer.adapter_on) for layer in lora_layers(model)]
    for layer, _ in layers:
        layer.adapter_on = False
    try:
        yield
    finally:
        for layer, was_on in layers:
            layer.adapter_on = was_on
