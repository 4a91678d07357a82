"""Decoding: turn next-token logits into tokens, one at a time, with a KV cache.

Three layers, each usable on its own:

    sample_next(logits, ...)   one step on (B, V) logits: greedy, or temperature -> top-k -> top-p
                               -> draw
    DecodeSession(model, ...)  the model side: tokens in, next-token logits out (cached or not)
    stream(model, idx, ...)    the loop: yields each new (B,) token; `generate` collects it

Beyond the context. The model has absolute position embeddings, so a cached key is only valid for
the position it was computed at: a cache cannot simply be rolled left when it is full. Without a
cache every step reads the last `context_length` tokens (a sliding window). With a cache, when it is
full it is cleared and re-filled from the last `context_length // 2` tokens (one batched forward),
and decoding continues one position at a time from there. So the cached window shrinks to half the
context at each rebuild and grows back to the full context before the next one: a cached token past
the context sees between `context_length // 2` and `context_length` tokens, where the uncached one
sees exactly `context_length`. The two agree exactly (up to float rounding) until the sequence first
outgrows the context, and differ after it. The price of the uncached window is a full-context
forward for every token; the cached rebuild costs one half-context forward per `context_length // 2`
tokens, about one extra position per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar, cast

import torch
from torch import Tensor

from gpt.base.device import autocast, eval_mode
from gpt.base.errors import UserError
from gpt.model.model import GPT, KVCache
from gpt.model.tokenizer import ENDOFTEXT, get_tokenizer


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None) -> None:
    """Raise `UserError` for a value `stream` cannot use; the message names the accepted range.

    `stream` calls it; `generate.py` calls it too, before loading a model, so that a typo fails at
    once.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens,
                                                          int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1 (or None to keep every token), got "
                        f"{top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")


SEED_LIMIT = 2**63
"""A sampling seed is in [0, SEED_LIMIT): what `torch.Generator.manual_seed` takes on every version.
"""


def check_seed(seed: int | None) -> None:
    """Raise `UserError` for a sampling seed a torch generator cannot take (None: an unseeded one).
    """
    valid = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT
    if seed is not None and not valid:
        raise UserError(f"--seed must be an integer in [0, 2^63), got {seed!r}; e.g. --seed 123")


def nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the nucleus: the smallest set of most likely tokens whose
    probabilities sum to at least `top_p`. It always keeps the most likely token."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # A token is in the nucleus iff the more likely tokens alone have not yet reached top_p.
    outside_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    outside = outside_sorted.scatter(-1, order, outside_sorted)  # back to the logits' order
    return logits.masked_fill(outside, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of (B, V) logits -> (B,) ids.

    Temperature 0 is the argmax. Otherwise a draw from softmax(logits / temperature) restricted to
    the `top_k` most likely tokens (exactly k; ties at the k-th broken arbitrarily), then to the
    nucleus of mass `top_p` of that renormalised distribution. Restricting is done by dropping the
    other tokens before the softmax, which is the same distribution as masking them to -inf, but
    with top-k every later operation (and the draw) works on k entries instead of the vocabulary.
    `generator` must live on the logits' device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float32 whatever the model's dtype: bf16 softmax would round small probabilities to 0.
    logits = logits.float()
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k) each; the order is kept
    logits = logits / temperature  # after top-k: dividing by T > 0 does not change the ranking
    if top_p is not None and top_p < 1.0:
        logits = nucleus(logits, top_p)
    choice = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


Module = TypeVar("Module", bound=torch.nn.Module)


def compile_for_decoding(model: Module) -> Module:
    """`torch.compile(model)` for `generate` and `stream`, with inductor's weight freezing.

    A cached decoding step multiplies one vector by every weight matrix, so its speed is how fast
    the weights stream from memory. Freezing lets inductor treat the weights as constants and
    pre-pack each matrix into the blocked layout oneDNN's kernels read fastest, so the weight
    products run closer to the memory's bandwidth and tokens/s rise (measured in BENCHMARKS.md).
    Without freezing, compiling gains little here.

    Costs: a compilation at the first call (again for a new batch size), a packed copy of the
    weights in memory, and weights fixed at compile time (later updates are not seen). The
    setting is process-wide (`torch._inductor.config.freezing`) and applies to every model compiled
    afterwards and then run without gradients, so use it in a process that only generates
    (as `generate.py --compile` does), not in one that trains and evaluates compiled models.
    """
    from torch._inductor import config as inductor_config  # here, not at the top: a slow import

    inductor_config.freezing = True
    return cast(Module, torch.compile(model))  # a wrapper that forwards attributes to `model`


class DecodeSession:
    """The model side of one decoding: feed tokens, get the logits (B, V) of the token that follows.

    `start(prompt)` then `step(token)` per new token. With `use_cache` each step runs the model on
    one position; without, on the whole window. See the module docstring for what happens past the
    context. Only the last position goes through the LM head (`last_only`). Like any forward, it
    records autograd history unless run under `torch.inference_mode()` or `torch.no_grad()`
    (`stream` is).
    """

    def __init__(self, model: GPT, use_cache: bool = True) -> None:
        # `model` may be compiled (`compile_for_decoding`): it is only ever called, through its
        # forward.
        self.model = model
        self.context_length = model.config.context_length
        self.rebuild_length = max(1, self.context_length // 2)
        self.use_cache = use_cache
        self.cache: list[KVCache] | None = None
        self.window = torch.empty(0, 0, dtype=torch.long)  # (B, W): the tokens the next logits read

    def start(self, prompt: Tensor) -> Tensor:
        """Feed the prompt (B, T), T >= 1; only its last `context_length` tokens are read."""
        self.window = prompt[:, -self.context_length:]
        if self.use_cache:
            self.cache = self.model.new_kv_cache(prompt.size(0))
        return self._logits(self.window)

    def step(self, token: Tensor) -> Tensor:
        """Append one token per row, (B,); return the logits for the token after it."""
        self.window = torch.cat([self.window, token[:, None]], dim=1)
        if self.cache is None:
            self.window = self.window[:, -self.context_length:]
            return self._logits(self.window)
        if self.cache[0].length < self.context_length:
            return self._logits(self.window[:, -1:])
        self.window = self.window[:, -self.rebuild_length:]
        for layer in self.cache:
            layer.clear()
        return self._logits(self.window)

    def _logits(self, new_tokens: Tensor) -> Tensor:
        # Through the model's forward, so that a `torch.compile`d model runs compiled here.
        return self.model(new_tokens, self.cache, last_only=True)[:, -1]  # (B, V)


def stream(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           use_cache: bool = True, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, a (B,) tensor, up to `max_new_tokens` times.

    `idx` (B, T) holds the prompts (T >= 1; only the last `context_length` tokens are read). A row
    that has produced `eos_id` is finished: it yields `eos_id` from then on, and the iteration stops
    early once every row is finished. The model runs in eval mode under `torch.inference_mode()`
    (its previous mode is restored at the end); autocast set by the caller applies.
    """
    if idx.dim() != 2 or idx.size(1) == 0 or idx.dtype != torch.long:
        raise UserError(f"idx must be a (batch, time) tensor of token ids with time >= 1, got "
                        f"shape {tuple(idx.shape)} and dtype {idx.dtype}")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    vocab_size = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise UserError(f"eos_id {eos_id} is not a token of this model (vocab_size {vocab_size}); "
                        "pass eos_id=None to never stop early")
    # Validation above runs at the call; the loop below only when the caller starts iterating.
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache,
                   generator)


# on a generator, torch enters/leaves the mode around each step, not across yields
@torch.inference_mode()
def _stream(model: GPT, idx: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, eos_id: int | None, use_cache: bool,
            generator: torch.Generator | None) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    with eval_mode(model):
        session = DecodeSession(model, use_cache)
        logits = session.start(idx)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            yield token
            if i + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                return
            logits = session.step(token)


def generate(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """The prompts `idx` (B, T) followed by up to `max_new_tokens` new tokens: (B, T + new).

    Fewer than `max_new_tokens` only when every row hit `eos_id` (rows that stopped earlier are
    padded with `eos_id`). See `stream` for the arguments.
    """
    new = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 eos_id=eos_id, use_cache=use_cache, generator=generator)
    return torch.cat([idx, *(token[:, None] for token in new)], dim=1)


def sample_text(model: GPT, prompt: str, max_new_tokens: int, *, seed: int,
                dtype: torch.dtype) -> str:
    """`prompt` and `max_new_tokens` tokens after it, drawn from the top 40 at temperature 1: the
    sample a training run prints after each epoch.

    The draws come from a generator of their own, seeded with `seed`: sampling never touches the
    global random stream that dropout uses, so a run trains the same with or without samples, and
    each sample differs from the last only because the model did.
    """
    tokenizer = get_tokenizer()
    device = model.tok_emb.weight.device
    idx = torch.tensor([tokenizer.encode(prompt, allowed_special={ENDOFTEXT})], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with autocast(device, dtype):
        out = generate(model, idx, max_new_tokens, temperature=1.0, top_k=40, generator=generator)
    return tokenizer.decode(out[0].tolist())
