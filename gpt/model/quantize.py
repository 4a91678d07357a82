"""Weights in the form a decoding step reads fastest: weight-only int8, or bf16 prepacked for
oneDNN.

A cached decoding step multiplies one token's vector by every weight matrix once, so its speed is
how fast the weights come out of memory and through the kernel (BENCHMARKS.md, "Decoding"). Both
forms below replace the `nn.Linear` layers of a loaded `GPT` once, before decoding; the rest of the
model (embeddings, LayerNorms, attention, the KV cache) is unchanged.

    quantize_int8(model, include_head=True)   int8 weights, one scale per output row (`Int8Linear`)
    prepack(model)                             bf16 weights in oneDNN's blocked layout
                                               (`PackedLinear`)
    prepare_for_decoding(model, scheme)        what `generate.py --quantize SCHEME` applies

Int8, weight-only: w ~ q * scale, q an int8 in [-127, 127] and one scale per output row (symmetric,
per output channel), so a step reads half the bytes of bf16. Activations stay in the compute dtype.
The kernel is `torch._weight_int8pack_mm` (gpt-fast's CPU and Apple-GPU path), chosen because:

- it is the only weight-only int8 product torch ships for eager use: it converts each int8 weight to
  float in registers, so no matrix of the weight's size is written. Dequantizing to bf16 and then
  multiplying writes the matrix in bf16 and reads it again, which is slower than plain bf16. torch's
  other int8 linears (fbgemm and oneDNN dynamic quantization, `onednn::qlinear_pointwise`) quantize
  the activations as well, which changes the model's arithmetic; torchao or Intel's extension would
  be heavy new dependencies for the same kind of kernel.
- on x86 its only vectorised path takes bfloat16 activations (float32 and float16 run a scalar loop,
  slower than the unquantized product), so on a CPU int8 computes in bfloat16.
- it reads the activation in aligned steps of 16 values and has no tail loop: `in_features` must be
  a multiple of 16, and a strided or misaligned input row would crash the process, so `Int8Linear`
  copies such an input first.
- it is bound by its int8-to-float conversion more than by memory on a quiet CPU; it gains most
where
  memory is the bottleneck (more cores, or other processes reading memory).

Each scale is rounded to the compute dtype *before* the weights are divided by it, so the kernel
multiplies by exactly the scale the int8 values were made for. The kernel reads its weight as a
row-major block and refuses any other layout, so the int8 weight is laid out that way whatever the
layer's weight was (an imported GPT-2 checkpoint's are transposed views, see `gpt.weights`).
GPT-2's LM head shares its tensor with the token embedding: quantizing the head makes an int8 copy
and leaves the embedding's table as it is (lookups read one row per token, so a step still reads
only the int8 head).

Prepacked bf16: `F.linear` hands oneDNN the plain (out, in) matrix on every call; reordered once
into the blocked layout oneDNN's product reads fastest for a one-row input (what inductor's weight
freezing does under `--compile`, without the compile), the same product runs faster and gives the
same bits for one row (a decoding step); for more rows (the prompt) it may round differently in the
last bit. Only for bfloat16 on a CPU with native bf16 (in float32 it was no faster and not
bit-identical).

Should either kernel still fail (a torch build or CPU it has not met), the failure is a one-line
`UserError` naming the setting that avoids it, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gpt.base.device import has_native_bf16, user_error_for
from gpt.base.errors import UserError, describe
from gpt.model.model import GPT

SCHEMES = {
    "none": "the weights as loaded (bf16 prepacked on a CPU with native bf16)",
    "int8": "int8 weights in every linear layer, the LM head included",
    "int8-no-head": "int8 weights in the transformer blocks; the LM head stays in the compute "
                    "dtype",
}
INT8_KERNEL = "aten::_weight_int8pack_mm"
ROW_ALIGNMENT = 32  # bytes: the kernel's aligned vector loads (torch allocates on 64)
K_MULTIPLE = 16  # the kernel reads 16 values per step with no tail loop
# `--quantize none` still prepacks bf16 (the "none" of SCHEMES); weights in another dtype never are.
PACKED_FIX = "use --quantize none with --dtype float32, whose weights are not prepacked"


def check_scheme(name: str) -> None:
    """Raise `UserError` unless `name` is one of `SCHEMES`."""
    if name not in SCHEMES:
        raise UserError(f"unknown --quantize {name!r}; use one of: {', '.join(SCHEMES)}")


def check_int8_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Raise `UserError` unless int8 weight-only products can run on `device` with `dtype`
    activations."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}.get(device.type)
    if dispatch_key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(INT8_KERNEL,
                                                                                  dispatch_key):
        raise UserError(f"int8 quantization needs torch's {INT8_KERNEL} kernel, which torch "
                        f"{torch.__version__} does not have for {device.type}; use --device cpu, "
                        "or drop --quantize")
    if device.type == "cpu" and dtype != torch.bfloat16:
        raise UserError(f"int8 quantization on a CPU computes in bfloat16 (its kernel has no fast "
                        f"{str(dtype).removeprefix('torch.')} path); use --dtype bfloat16 (or "
                        f"auto), "
                        "or drop --quantize")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q, scales): `weight` (out, in) ~ q * scales[:, None], q int8 in [-127, 127], scales in
    `weight`'s dtype, one per row, each the row's largest magnitude / 127 (rounded first). `q` is
    row-major (contiguous), as the int8 kernel reads it, whatever the layout of `weight`."""
    w = weight.detach().float()
    tiny = torch.finfo(weight.dtype).tiny  # an all-zero row (vocabulary padding): q = 0, any scale
    scales = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(weight.dtype)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def kernel_error(exc: RuntimeError, kernel: str, fix: str) -> RuntimeError | UserError:
    """What to raise for `exc`, raised by `kernel`: a one-line `UserError` naming `fix`, except for
    running out of memory, which stays as it is for the caller's own advice
    (`flag_fixable_errors`)."""
    if user_error_for(exc, "") is not None:
        return exc
    return UserError(f"torch's {kernel} failed on this machine ({describe(exc)}); {fix}")


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and one scale per output row: y = x @ (q * scales).T + bias.

    Its state (`weight` int8, `scales`, `bias`) is ordinary buffers and parameters, so
    `state_dict`/`load_state_dict` round-trip it; load into a model quantized the same way.
    """

    weight: Tensor
    scales: Tensor

    def __init__(self, weight: Tensor, scales: Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,), the compute dtype
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_rows(linear.weight), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if not rows.is_contiguous() or rows.data_ptr() % ROW_ALIGNMENT:
            rows = rows.clone(memory_format=torch.contiguous_format)  # a fresh, aligned block
        try:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)  # (N, out)
        except RuntimeError as exc:
            raise kernel_error(exc, "int8 kernel", "use --quantize none") from None
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight is kept only in oneDNN's blocked layout (opaque, no storage of its
    own).

    For decoding: build it from a loaded layer; `state_dict` unpacks the weight (same keys and
    values as the `nn.Linear`), but loading a state dict into it is not supported (pack after
    loading).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        try:
            # 1 row
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        except RuntimeError as exc:
            raise kernel_error(exc, "bf16 weight prepacking", PACKED_FIX) from None
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        try:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        except RuntimeError as exc:
            raise kernel_error(exc, "prepacked bf16 kernel", PACKED_FIX) from None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)


def replace_linears(model: GPT, make: Callable[[nn.Linear], nn.Module], include_head: bool) -> GPT:
    """Swap every `nn.Linear` of `model` (the LM head only if `include_head`) for `make(layer)`."""
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and (include_head or child is not model.lm_head):
                    setattr(parent, name, make(child))
    return model


def quantize_int8(model: GPT, *, include_head: bool = True) -> GPT:
    """Make `model`'s linear layers `Int8Linear` in place (the LM head too if `include_head`);
    returns it.

    Quantize after moving the model to its device and dtype: the scales take the weights' dtype,
    which is the dtype the activations must have. Raises `UserError` where the int8 kernel cannot
    run (see `check_int8_supported`) or the width is not a multiple of 16. A tied LM head gets its
    own int8 copy; the token embedding is not touched.
    """
    weight = model.tok_emb.weight
    check_int8_supported(weight.device, weight.dtype)
    if model.config.emb_dim % K_MULTIPLE:
        raise UserError(f"int8 quantization needs the model's width (emb_dim) to be a multiple of "
                        f"{K_MULTIPLE}, this model's is {model.config.emb_dim}; drop --quantize")
    return replace_linears(model, Int8Linear.from_linear, include_head)


def can_prepack(model: GPT) -> bool:
    """Whether `prepack` applies: bf16 weights on a CPU whose oneDNN runs bf16 natively."""
    weight = model.tok_emb.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and has_native_bf16(weight.device))


def prepack(model: GPT) -> GPT:
    """Make `model`'s remaining `nn.Linear` layers (all, the LM head included) `PackedLinear`, in
    place.

    Requires `can_prepack(model)`. The packed copy of a tied LM head is separate from the token
    embedding, which keeps its table. Returns the model.
    """
    if not can_prepack(model):
        raise UserError("prepacking needs bfloat16 weights on a CPU with native bf16 (AVX512-BF16 "
                        "or AMX); leave the weights as they are")
    return replace_linears(model, PackedLinear, include_head=True)


def prepare_for_decoding(model: GPT, scheme: str = "none", pack: bool = True) -> GPT:
    """`model` with `scheme`'s int8 layers (see `SCHEMES`), its other linear layers prepacked when
    `pack` and `can_prepack(model)`. In place; returns the model."""
    check_scheme(scheme)
    if scheme != "none":
        quantize_int8(model, include_head=scheme == "int8")
    if pack and can_prepack(model):
        prepack(model)
    return model
