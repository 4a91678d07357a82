"""The decoding loop of the server: continuous batching of every request in flight, on one thread.

Requests (`Job`: one prompt, `n` choices) come from the web server's threads through `submit`. The
engine thread repeats one step:

1. drop the rows of cancelled jobs (a client that went away frees its cache at once);
2. admit waiting jobs while the cache has rows for all their choices: prefill the prompt once
   (`batch.prefill`, the model's own forward), copy it to the other choices' rows, sample each
   choice's first token;
3. feed every row its last token in one batched forward (`batch.decode_step`), sample each row's
   next token with that row's own settings and generator, and let finished rows leave.

So a request that arrives while others decode joins at the next step, and a step costs about as
much for 8 rows as for one: the weights are read once per step, not once per row. A prompt is
prefilled alone while the others wait for that step (no chunked prefill).

Past the context the engine does what `gpt.model.sampling.DecodeSession` does, per row: a full row
is emptied and re-filled from its last `context_length // 2` tokens, so a request alone gets the
tokens `generate` gives.

Each step's results go to each job's `emit` callback, on the engine thread: a list of `Event`s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tiktoken
import torch
from torch import Tensor

from gpt.model.model import GPT
from gpt.model.sampling import sample_next
from gpt.serve.batch import RowCache, decode_step, prefill
from gpt.serve.text import Detokenizer, Piece, StopFilter

log = logging.getLogger("gpt.serve")


@dataclass(frozen=True)
class Sampling:
    """What the client asked of each choice: already checked by `gpt.serve.protocol`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely tokens'."""


@dataclass
class Event:
    """What one step produced for one choice of a job."""

    choice: int
    pieces: list[Piece]
    finish_reason: str | None = None
    """"stop" (end-of-text or a stop string), "length" (max_tokens), or None while it goes on."""
    completion_tokens: int = 0
    """Tokens the choice has generated so far (end-of-text included)."""
    error: str | None = None


@dataclass(eq=False)  # compared and hashed by identity: two equal requests are two jobs
class Job:
    """One prompt with `n` choices; `emit` gets each step's events, on the engine thread."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[list[Event]], None]
    n: int = 1
    first_choice: int = 0
    """The index of the job's first choice in its response (a request may hold several prompts)."""
    cancelled: bool = False
    """Set by the web server when the client is gone; the engine drops the job at its next step."""


@dataclass
class Sequence:
    """One choice being generated: its cache row and its text state."""

    job: Job
    choice: int
    generator: torch.Generator
    detok: Detokenizer
    stop: StopFilter
    window: list[int]
    """The tokens the cache row holds (as `DecodeSession.window`), then the next one to feed."""
    generated: int = 0
    events: list[Event] = field(default_factory=list)


class Engine:
    """Owns the model and a `RowCache` of `max_rows` rows; `start()` runs the loop on a thread."""

    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, max_rows: int,
                 eos_id: int | None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = RowCache(model, max_rows)
        self.eos_id = eos_id
        self.device = model.tok_emb.weight.device
        self.context = model.config.context_length
        self.rebuild = max(1, self.context // 2)
        self.rows: list[Sequence] = []  # rows[i] is cache row i
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.backlog: list[Job] = []  # taken from `waiting`, not yet admitted (FIFO)
        self.thread = threading.Thread(target=self._loop, name="gpt-serve-engine", daemon=True)
        self.closing = False
        # Counters for /health and the benchmark: where the engine's time goes.
        self.generated_tokens = 0
        self.steps = self.step_rows = self.prefill_tokens = 0
        self.step_seconds = self.prefill_seconds = 0.0

    # ---- called from other threads -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closing = True
        self.waiting.put(None)  # wakes a loop that waits for work
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if job.n > self.cache.max_rows:
            raise ValueError(f"n={job.n} is more than the {self.cache.max_rows} rows of the cache")
        self.waiting.put(job)

    def stats(self) -> dict[str, int | float]:
        return {"active_sequences": len(self.rows), "queued_requests": self.waiting.qsize()
                + len(self.backlog), "max_batch": self.cache.max_rows,
                "generated_tokens": self.generated_tokens, "decode_steps": self.steps,
                "decode_rows": self.step_rows, "decode_seconds": round(self.step_seconds, 3),
                "prefill_tokens": self.prefill_tokens,
                "prefill_seconds": round(self.prefill_seconds, 3)}

    # ---- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.closing:
            self._take_waiting(block=not self.rows and not self.backlog)
            self._drop_cancelled()
            self._admit()
            if self.rows:
                self._guarded(self._step, [s.job for s in self.rows])

    def _take_waiting(self, block: bool) -> None:
        with contextlib.suppress(queue.Empty):
            job = self.waiting.get(block=block, timeout=0.5 if block else None)
            while True:
                if job is not None:
                    self.backlog.append(job)
                job = self.waiting.get_nowait()

    def _guarded(self, work: Callable[[], None], jobs: list[Job]) -> None:
        """Run `work`; if it fails (a bug, out of memory), end `jobs` with the error and free their
        rows, so that the server goes on serving the next requests."""
        try:
            work()
        except Exception as exc:  # reported to the clients: the loop must survive
            log.exception("generation failed")
            message = f"generation failed: {type(exc).__name__}: {exc}"
            for job in dict.fromkeys(jobs):
                job.emit([Event(job.first_choice, [], "error", error=message)])
                job.cancelled = True
            while self.cache.rows > len(self.rows):  # a row added just before the failure
                self.cache.lengths.pop()
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        self.backlog = [job for job in self.backlog if not job.cancelled]
        for row in reversed(range(len(self.rows))):
            if self.rows[row].job.cancelled:
                self._free(row)

    def _free(self, row: int) -> None:
        moved = self.cache.remove(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()

    def _admit(self) -> None:
        while self.backlog and self.cache.rows + self.backlog[0].n <= self.cache.max_rows:
            job = self.backlog.pop(0)
            self._guarded(functools.partial(self._start, job), [job])

    def _start(self, job: Job) -> None:
        sequences = [self._sequence(job, i, job.prompt) for i in range(job.n)]
        first = self.cache.add()
        self.rows.append(sequences[0])
        logits = self._prefill(first, job.prompt)
        for sequence in sequences[1:]:
            row = self.cache.add()
            self.cache.move(first, row)
            self.rows.append(sequence)
        start = len(self.rows) - job.n
        self._sample(list(range(start, len(self.rows))), logits.expand(job.n, -1))

    def _sequence(self, job: Job, i: int, prompt: list[int]) -> Sequence:
        generator = torch.Generator(self.device)
        seed = job.sampling.seed
        if seed is None:
            generator.seed()
        else:  # choice i draws from seed + i: repeatable, and unlike its siblings
            generator.manual_seed((seed + job.first_choice + i) % 2**64)
        return Sequence(job, job.first_choice + i, generator, Detokenizer(self.tokenizer),
                        StopFilter(list(job.sampling.stop)), list(prompt))

    def _step(self) -> None:
        """Feed every row its newest token (the last of its window); sample the next ones."""
        full = self._move_full_rows_last()
        batched = len(self.rows) - len(full)
        logits = []
        if batched:
            started = time.perf_counter()
            tokens = torch.tensor([s.window[-1] for s in self.rows[:batched]], device=self.device)
            logits.append(decode_step(self.model, self.cache, tokens))
            self.steps, self.step_rows = self.steps + 1, self.step_rows + batched
            self.step_seconds += time.perf_counter() - started
        for row in full:  # as DecodeSession.step: empty the row, re-fill it from the window's end
            sequence = self.rows[row]
            sequence.window = sequence.window[-self.rebuild:]
            logits.append(self._prefill(row, sequence.window)[None])
        self._sample(list(range(len(self.rows))), torch.cat(logits))

    def _prefill(self, row: int, ids: list[int]) -> Tensor:
        started = time.perf_counter()
        logits = prefill(self.model, self.cache, row, torch.tensor(ids, device=self.device))
        self.prefill_tokens += len(ids)
        self.prefill_seconds += time.perf_counter() - started
        return logits

    def _move_full_rows_last(self) -> list[int]:
        """Swap the rows whose cache is full to the end (decode_step feeds rows 0..B-1); their
        indices. A full row's cache is about to be re-filled, so only the other row is copied."""
        full = [i for i, n in enumerate(self.cache.lengths) if n >= self.context]
        end = len(self.rows)
        for row in full:
            end -= 1
            while end > row and self.cache.lengths[end] >= self.context:
                end -= 1
            if end <= row:
                break
            self.cache.move(end, row)
            self.cache.lengths[end] = self.context
            self.rows[row], self.rows[end] = self.rows[end], self.rows[row]
        return list(range(len(self.rows) - len(full), len(self.rows)))

    def _sample(self, rows: list[int], logits: Tensor) -> None:
        """Pick the next token of each row in `rows` from its logits (one row of `logits` each),
        send the events, free the rows that finished."""
        greedy = logits.argmax(dim=-1).tolist()
        wanted = [i for i, row in enumerate(rows)
                  if self.rows[row].job.sampling.logprobs is not None]
        logp = logits[wanted].float().log_softmax(dim=-1) if wanted else None
        finished = []
        for i, row in enumerate(rows):
            sequence = self.rows[row]
            s = sequence.job.sampling
            token = greedy[i] if s.temperature == 0 else int(sample_next(
                logits[i:i + 1], s.temperature, s.top_k, s.top_p, sequence.generator))
            piece_logp, top = None, None
            if logp is not None and s.logprobs is not None:
                row_logp = logp[wanted.index(i)]
                piece_logp = float(row_logp[token])
                values, ids = row_logp.topk(s.logprobs) if s.logprobs else (row_logp[:0],) * 2
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            if self._advance(sequence, token, piece_logp, top):
                finished.append(row)
        self.generated_tokens += len(rows)
        self._send(rows)
        for row in sorted(finished, reverse=True):
            self._free(row)

    def _advance(self, sequence: Sequence, token: int, logp: float | None,
                 top: list[tuple[int, float]] | None) -> bool:
        """Take one sampled token into `sequence`; True when the choice is finished."""
        sequence.generated += 1
        s = sequence.job.sampling
        if token == self.eos_id:
            return self._finish(sequence, [], "stop")
        released, stopped = sequence.stop.push(sequence.detok.piece(token, logp, top))
        if stopped:
            return self._finish(sequence, released, "stop", flush=False)
        if sequence.generated >= s.max_tokens:
            return self._finish(sequence, released, "length")
        sequence.window.append(token)
        if released:
            sequence.events.append(Event(sequence.choice, released,
                                         completion_tokens=sequence.generated))
        return False

    def _finish(self, sequence: Sequence, pieces: list[Piece], reason: str,
                flush: bool = True) -> bool:
        if flush:
            pieces = pieces + sequence.stop.finish()
            tail = sequence.detok.flush()  # an unfinished character at the end: U+FFFD
            if tail and pieces:
                last = pieces[-1]
                pieces[-1] = Piece(last.token, last.text + tail, last.raw, last.logprob, last.top)
            elif tail:
                pieces = [Piece(-1, tail, b"")]
        sequence.events.append(Event(sequence.choice, pieces, reason, sequence.generated))
        return True

    def _send(self, rows: list[int]) -> None:
        by_job: dict[int, tuple[Job, list[Event]]] = {}
        for row in rows:
            sequence = self.rows[row]
            if sequence.events:
                by_job.setdefault(id(sequence.job), (sequence.job, []))[1].extend(sequence.events)
                sequence.events = []
        for job, events in by_job.values():
            job.emit(events)
