"""Batched decoding with a KV cache in which every row sits at its own position.

`gpt.model.model.KVCache` holds one length for the whole batch: every row of a batch must start and
step together, which is what `generate` does. A server's rows do not: a request that arrives while
others decode starts with its own prompt length, and rows that finish leave. `RowCache` keeps one
length per row and `decode_step` feeds one new token to each row at that row's own position:

    cache = RowCache(model, max_rows)
    logits = prefill(model, cache, row, prompt_ids)     # one row, the model's own forward
    logits = decode_step(model, cache, tokens)          # rows 0..B-1, one token each

Rows are kept contiguous (0..B-1 in use), so a step reads the cache through a view, never a
gathered copy; `remove(row)` moves the last row into the freed one.

Prefill runs `GPT.forward` itself on one row, writing straight into that row's slice of the cache
(`RowView`). `decode_step` is the model's block written out again (the same modules in the same
order, see `CausalSelfAttention.forward`) with one change: positions and the attention mask come
per row. With one row, or rows of equal length, it passes no mask, so its arithmetic is the same
as `GPT.forward` with a `KVCache`: greedy text then equals `generate.py`'s. With rows of different
lengths the mask hides each row's unused cache positions; the products then run on B rows at
once, which may round differently in the last bit than one row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.model.model import GPT, Block, KVCache


class RowView(KVCache):
    """A `KVCache` whose buffers are one row of a `RowCache`: `GPT.forward` prefills it in place."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        # No super().__init__: it would allocate buffers; these are views of the row's storage.
        self.keys, self.values, self.length = keys, values, 0


class RowCache:
    """Per-layer keys and values for up to `max_rows` sequences, each with its own length.

    The buffers grow (doubling) as rows are added, up to `max_rows`, and never shrink: memory stays
    flat under a steady load. Each row holds the model's whole context.
    """

    def __init__(self, model: GPT, max_rows: int) -> None:
        cfg = model.config
        weight = model.tok_emb.weight
        self.max_rows = max_rows
        self.shape = (cfg.n_heads, cfg.context_length, cfg.head_dim)
        # The weights' dtype is what attention produces: the server runs without autocast.
        self.device, self.dtype = weight.device, weight.dtype
        self.keys = [self._empty(0) for _ in range(cfg.n_layers)]  # (capacity, H, L, D) each
        self.values = [self._empty(0) for _ in range(cfg.n_layers)]
        self.lengths: list[int] = []  # positions filled, per row in use

    def _empty(self, rows: int) -> Tensor:
        # Zeros, not torch.empty: a row's positions past its length are read too (masked), and a
        # masked score still multiplies its value by 0, which is NaN if the memory held a NaN.
        return torch.zeros(rows, *self.shape, device=self.device, dtype=self.dtype)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys[0].size(0)

    def bytes_per_row(self) -> int:
        n_heads, length, head_dim = self.shape
        return 2 * len(self.keys) * n_heads * length * head_dim * self.keys[0].element_size()

    def add(self) -> int:
        """A new empty row at the end; returns its index."""
        if self.rows == self.max_rows:
            raise RuntimeError(f"RowCache is full ({self.max_rows} rows)")
        if self.rows == self.capacity:
            grown = min(self.max_rows, max(1, 2 * self.capacity))
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    new = self._empty(grown)
                    new[:old.size(0)] = old
                    buffers[i] = new
        self.lengths.append(0)
        return self.rows - 1

    def remove(self, row: int) -> int | None:
        """Free `row`. The last row moves into its place; returns that last row's old index, or
        None when `row` was the last one (nothing moved)."""
        last = self.rows - 1
        if row != last:
            self.move(last, row)
        self.lengths.pop()
        return last if row != last else None

    def move(self, source: int, target: int) -> None:
        """Make `target` hold what `source` holds (its filled positions only); `source` is kept.

        Also how n choices of one prompt share its prefill: copied, not computed again.
        """
        length = self.lengths[source]
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]
        self.lengths[target] = length

    def views(self, row: int) -> list[KVCache]:
        """The row as one `KVCache` per layer, emptied: `GPT.forward` refills it from position 0."""
        self.lengths[row] = 0
        return [RowView(k[row:row + 1], v[row:row + 1])
                for k, v in zip(self.keys, self.values, strict=True)]


@torch.inference_mode()
def prefill(model: GPT, cache: RowCache, row: int, ids: Tensor) -> Tensor:
    """Run token ids (T,) through `model` into the (emptied) `row`; the next-token logits (V,).

    `generate`'s own forward on one row: the same logits it gets from the same prompt.
    """
    views = cache.views(row)
    logits = model(ids[None], views, last_only=True)[0, -1]
    cache.lengths[row] = views[0].length
    return logits


@torch.inference_mode()
def decode_step(model: GPT, cache: RowCache, tokens: Tensor) -> Tensor:
    """Append token `tokens[r]` to row r of `cache` for rows 0..B-1; the logits (B, V).

    Each row's token goes to that row's position (its length so far); a row must have room for it
    (length < context_length). Rows from B on are left alone. `model` must be in eval mode (no
    dropout here).
    """
    B = tokens.size(0)  # the shape letters of gpt/model/model.py
    if cache.rows < B:
        raise ValueError(f"{B} tokens for {cache.rows} rows in use")
    lengths = cache.lengths[:B]
    positions = torch.tensor(lengths, device=tokens.device)  # (B,): where each new token goes
    S = max(lengths) + 1  # positions any row attends to
    mask = None
    if min(lengths) + 1 != S:  # rows of different lengths: each sees only its own positions
        mask = (torch.arange(S, device=tokens.device) <= positions[:, None])[:, None, None, :]
    rows = torch.arange(B, device=tokens.device)
    x = model.tok_emb(tokens[:, None]) + model.pos_emb(positions)[:, None]  # (B, 1, C)
    for block, keys, values in zip(model.blocks, cache.keys, cache.values, strict=True):
        assert isinstance(block, Block)
        attn = block.attn
        C = x.size(-1)
        q, k, v = attn.qkv(block.norm1(x)).split(C, dim=2)  # 3 x (B, 1, C)
        q = q.view(B, 1, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, 1, D)
        keys[rows, :, positions] = k.view(B, attn.n_heads, attn.head_dim).to(keys.dtype)
        values[rows, :, positions] = v.view(B, attn.n_heads, attn.head_dim).to(values.dtype)
        y = F.scaled_dot_product_attention(q, keys[:B, :, :S].to(q.dtype),
                                           values[:B, :, :S].to(q.dtype),
                                           attn_mask=mask)  # (B, H, 1, D)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.norm2(x))
    for i in range(B):
        cache.lengths[i] += 1
    logits: Tensor = model.lm_head(model.final_norm(x))[:, -1, :model.config.vocab_size]
    return logits
