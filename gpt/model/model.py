"""The GPT-2 model, written out by hand, top-down: GPT -> Block -> (CausalSelfAttention, MLP).

Module names are chosen so that loading GPT-2 weights is a key map (see
`gpt/checkpoints/weights.py`):

    tok_emb, pos_emb                        token and position embeddings
    blocks.{i}.norm1, .attn.qkv, .attn.proj pre-LayerNorm, fused q/k/v projection, output projection
    blocks.{i}.norm2, .mlp.fc, .mlp.proj    pre-LayerNorm, 4x expansion, projection back
    final_norm, lm_head                     last LayerNorm and the (tied) output layer

Shapes in comments: B batch, T new positions, S positions attended to (cache + new), C emb_dim,
H heads, D head size (C = H * D), V vocab size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gpt.base.errors import UserError
from gpt.model.config import GPTConfig
from gpt.model.loss import head_loss, lm_loss


def reference_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal attention written as the formula: dropout(softmax(QKᵀ/√D + M)) V.

    M is 0 where query i may see key j and -inf where it may not (j in its future). With a KV cache
    the T queries are the *last* T of the S positions, so query i sits at absolute position S - T +
    i. The model calls `F.scaled_dot_product_attention`, which computes the same thing with fused
    kernels and without materialising the (T, S) score matrix; this function is its documentation,
    and the tests check that the two agree (bit for bit in float32 without dropout: Q and K are each
    scaled by D^-1/4, as in SDPA's own fallback).

    The model also trains through it when there is attention dropout and no GPU: SDPA has no fused
    kernel with dropout on a CPU, and its fallback runs every (T, S) matrix in float32 even under
    bf16 autocast, where written out they stay bf16 (the matmuls still accumulate in float32), and
    draws its mask with `F.dropout`, slower than `dropout_keep_mask`.
    """
    T, S = q.size(-2), k.size(-2)
    scale = math.sqrt(1 / math.sqrt(q.size(-1)))
    scores = (q * scale) @ (k.transpose(-2, -1) * scale)  # (B, H, T, S)
    M = torch.full((T, S), float("-inf"), dtype=scores.dtype, device=q.device).triu(diagonal=S - T
                                                                                    + 1)
    # in place, as in SDPA's fallback: no copy of the scores, and no pass over them in backward
    scores += M
    weights = torch.softmax(scores, dim=-1)
    # inverted dropout: zero each weight with probability p, scale the rest by 1/(1-p)
    if dropout_p > 0:
        keep = dropout_keep_mask(weights.shape, dropout_p, weights.device)
        # The 1/(1-p) goes on V, (S, D) per head: fewer numbers to scale than the (T, S) weights.
        weights, v = weights * as_factor(keep), v / (1 - dropout_p)
    return weights @ v  # (B, H, T, D)


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A random boolean mask of `shape`, each element True (kept) with probability 1 - p.

    The model's every dropout draws its mask here off CUDA. `torch.bernoulli` (`F.dropout`) draws
    one random number per element, and on a CPU drawing them is the slow part (for GPT-2's 1024 x
    1024 attention weights, slower than the attention's matmuls). A 64-bit draw
    holds four independent uniform 16-bit integers, and an element is kept when its integer is below
    round((1 - p) * 65536): a quarter of the draws. The keep probability is 1 - p rounded to a
    multiple of 1/65536, off by at most 1/131072 (dropout 0.1 keeps 58982/65536 = 0.899994...).
    """
    # the trick is for the CPU's generator; elsewhere, a plain uniform draw
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    *batch, n = shape
    draws = torch.empty(*batch, (n + 3) // 4, dtype=torch.int64, device=device)
    # the full range: every bit random
    uniform16 = draws.random_(-2**63, None).view(torch.int16)[..., :n]
    return uniform16 < round((1 - p) * 65536) - 2**15  # int16 counts from -2^15


class Dropout(nn.Dropout):
    """`nn.Dropout` with the mask of `dropout_keep_mask` off CUDA (on CUDA, F.dropout's fused
    kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type == "cuda":
            return super().forward(x)
        return x / (1 - self.p) * as_factor(dropout_keep_mask(x.shape, self.p, x.device))


def as_factor(keep: Tensor) -> Tensor:
    """A boolean mask as 1s and 0s to multiply by, the same bytes seen as uint8.

    x * mask is `torch.where(mask, x, 0)` for finite x, but on a CPU a product with a uint8 tensor
    runs vectorised, several times faster than `where` or a product with the bool tensor itself,
    which were the largest cost of GPT-2's attention dropout, forward and backward (BENCHMARKS.md).
    """
    return keep.view(torch.uint8)


class KVCache:
    """Keys and values of one layer, preallocated for the whole context so decoding never
    reallocates.

    Generation first feeds the prompt (prefill), then one token at a time; each call appends its
    keys/values at `length` and attends over everything cached so far.
    """

    def __init__(self, batch_size: int, n_heads: int, max_length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, n_heads, max_length, head_dim)
        # Uninitialised: only positions below `length` are ever read, and each is written first.
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (B, H, L, D)
        self.values = torch.empty(shape, device=device, dtype=dtype)  # (B, H, L, D)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new (B, H, T, D) keys/values; return all of them so far, (B, H, S, D)."""
        end = self.length + k.size(2)
        if end > self.keys.size(2):
            raise ValueError(f"KV cache overflow: {end} positions, room for {self.keys.size(2)}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end].to(k.dtype), self.values[:, :, :end].to(v.dtype)

    def clear(self) -> None:
        """Forget every position (the buffers stay allocated and are overwritten from position 0).
        """
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (as in GPT-2's `c_attn`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, D): each head attends independently over its own D channels.
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, D)
        S = k.size(2)
        # SDPA's is_causal aligns the mask top-left, which is right only when queries and keys are
        # the same positions. A single new query may see every key (no mask); a chunk appended to a
        # non-empty cache needs the mask shifted by S - T, built explicitly.
        mask = None
        if T > 1 and S > T:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        if self.training and self.drop_rate > 0 and x.device.type != "cuda":
            y = reference_attention(q, k, v, self.drop_rate)  # faster here: see its docstring
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(T > 1 and S == T),
                dropout_p=self.drop_rate if self.training else 0.0,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GPT-2's tanh-approximated GELU, project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.gelu(self.fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.drop_resid = Dropout(cfg.drop_rate)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.drop_resid(self.attn(self.norm1(x), cache))
        x = x + self.drop_resid(self.mlp(self.norm2(x)))
        return x


class GPT(nn.Module):
    """GPT-2: embeddings, `n_layers` blocks, final LayerNorm, LM head. `GPT(cfg)(idx)` -> logits,
    `GPT(cfg).loss(idx, targets)` -> the mean next-token cross-entropy (what training minimises)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = False
        """Recompute each block's activations in backward, not keep them (`hidden_states`)."""
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One Parameter in two places: the same storage, so an update to one is an update to
            # both.
            self.lm_head.weight = self.tok_emb.weight
        # else "torch": every module keeps the init its constructor drew
        if cfg.init_scheme == "gpt2":
            self._init_gpt2()
        with torch.no_grad():  # padding rows (cfg.vocab_pad_multiple): never read, kept at zero
            self.tok_emb.weight[cfg.vocab_size:] = 0.0
            self.lm_head.weight[cfg.vocab_size:] = 0.0

    def _init_gpt2(self) -> None:
        """GPT-2's init: every matrix N(0, 0.02), biases zero (LayerNorms keep ones and zeros).

        The layers that write into the residual stream are scaled down by 1/sqrt(2 * layers), so the
        stream's variance does not grow with depth (two such writes per block). PyTorch's defaults
        (`init_scheme="torch"`) instead draw embeddings from N(0, 1), a scale GPT-2 never trains at.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def forward(self, idx: Tensor, kv_cache: list[KVCache] | None = None,
                last_only: bool = False) -> Tensor:
        """Token ids (B, T) -> next-token logits (B, T, V). With `kv_cache`, idx continues the
        cache.

        `last_only` runs the LM head on the last position only, (B, 1, V): all that decoding needs,
        and for a 50k vocabulary the head is the largest matrix in the model.
        """
        hidden = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if last_only:
            hidden = hidden[:, -1:]  # (B, 1, C)
        return self.lm_head(hidden)[..., :self.config.vocab_size]  # padding rows' logits dropped

    def loss(self, idx: Tensor, targets: Tensor, *, chunk_size: int = 0) -> Tensor:
        """Token ids (B, T) and next-token targets (B, T) -> mean cross-entropy, a float32 scalar.

        The same as `lm_loss(self(idx), targets)` (targets equal to `IGNORE_INDEX` left out),
        through `gpt.model.loss.head_loss`: with `chunk_size` N the LM head and the loss run N
        positions at a time, so the (B, T, V) logits never exist whole. The head's padding rows get
        no logits.
        """
        return self.head_loss(self.hidden_states(idx), targets, chunk_size=chunk_size)

    def head_loss(self, hidden: Tensor, targets: Tensor, *, chunk_size: int = 0) -> Tensor:
        """The second half of `loss`: final-LayerNorm outputs (B, T, C) -> LM head -> cross-entropy.
        """
        # A head made for decoding (gpt.model.quantize) has no plain weight to chunk.
        if not isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(hidden)[..., :self.config.vocab_size]
            return lm_loss(logits, targets)
        return head_loss(hidden, self.lm_head.weight, targets, chunk_size, self.config.vocab_size)

    def hidden_states(self, idx: Tensor, kv_cache: list[KVCache] | None = None) -> Tensor:
        """Token ids (B, T) -> final-LayerNorm outputs (B, T, C), i.e. everything but the LM head.

        Kept separate so that `loss` can apply the head in chunks instead of materialising (B, T,
        V). With `activation_checkpointing` (and gradients on), backward recomputes each block's
        activations from its input, all the forward pass keeps of it (`torch.utils.checkpoint`).
        """
        T = idx.size(1)
        start = kv_cache[0].length if kv_cache else 0
        if start + T > self.config.context_length:
            raise UserError(
                f"sequence length {start + T} exceeds the model's context_length "
                f"{self.config.context_length}; crop the input to the last "
                f"{self.config.context_length} tokens"
            )
        positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, C)
        x = self.drop_emb(x)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and torch.is_grad_enabled() and not kv_cache:
                # Only the block's input is kept; backward runs the block again for the rest,
                # with the random generators as they were, so dropout draws the same masks.
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, kv_cache[i] if kv_cache else None)
        return self.final_norm(x)

    def new_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """Empty per-layer caches for `batch_size` sequences of up to `context_length` positions.

        The default dtype is the one attention will produce: the autocast dtype if autocast is on
        for the model's device, else the weights' dtype. A mismatch would still work but would
        convert the whole cache on every step.
        """
        weight = self.tok_emb.weight
        device_type = weight.device.type
        if dtype is None and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        cfg = self.config
        return [
            KVCache(batch_size, cfg.n_heads, cfg.context_length, cfg.head_dim,
                    weight.device, dtype or weight.dtype)
            for _ in range(cfg.n_layers)
        ]

    def num_parameters(self, count_tied_head_twice: bool = False) -> int:
        """Trainable parameters. With a tied head, it is counted once unless asked to count it
        twice.

        GPT-2 small: 124,439,808 (tied, counted once) or 163,037,184 (head counted again). Padding
        rows (`vocab_pad_multiple`) are not counted: they are never used.
        """
        cfg = self.config
        head = cfg.vocab_size * cfg.emb_dim
        padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.emb_dim
        # parameters() yields a shared tensor once
        total = sum(p.numel() for p in self.parameters())
        total -= padding if cfg.tie_embeddings else 2 * padding
        if count_tied_head_twice and cfg.tie_embeddings:
            total += head
        return total

    def tie_weights(self) -> None:
        """Make the LM head the token embedding's Parameter again, if the config ties them.

        Needed after `load_state_dict(..., assign=True)`, which gives each name its own Parameter;
        `gpt.checkpoints.checkpoint.model_from_state_dict` is the one loader that calls it.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
