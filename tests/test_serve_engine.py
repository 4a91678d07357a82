"""gpt.serve without HTTP: the per-row KV cache, the engine's batching, text and stop strings, chat
prompts."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt.data.records import format_prompt
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.sampling import generate
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.serve import engine as engine_module
from gpt.serve.batch import RowCache, decode_step, prefill
from gpt.serve.engine import Engine, Event, Job, Sampling
from gpt.serve.protocol import RequestError, Served, chat_ids, chat_prompt, parse_completion
from gpt.serve.text import Detokenizer, Piece, StopFilter

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = GPTConfig(context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                tie_embeddings=False)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    return GPT(CFG).eval()


# ---- the cache ----------------------------------------------------------------------------------


def test_a_batched_step_gives_each_row_the_logits_of_its_own_sequence(model: GPT) -> None:
    prompts = [torch.randint(0, 50000, (n,)) for n in (3, 9, 1, 14)]
    cache = RowCache(model, 4)
    for prompt in prompts:
        prefill(model, cache, cache.add(), prompt)
    tokens = torch.tensor([11, 22, 33, 44])
    logits = decode_step(model, cache, tokens)
    assert cache.lengths == [4, 10, 2, 15]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, tokens[row:row + 1]])[None])[0, -1]
            torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)


def test_one_row_steps_exactly_as_the_models_own_cache(model: GPT) -> None:
    prompt = torch.randint(0, 50000, (1, 5))
    expected = generate(model, prompt, 12)[0, 5:].tolist()
    cache = RowCache(model, 1)
    logits = prefill(model, cache, cache.add(), prompt[0])
    got = []
    for _ in range(12):
        got.append(int(logits.argmax(-1).reshape(-1)[0]))
        logits = decode_step(model, cache, torch.tensor(got[-1:]))
    assert got == expected


def test_rows_grow_move_and_leave(model: GPT) -> None:
    cache = RowCache(model, 3)
    for n in (2, 3, 4):
        prefill(model, cache, cache.add(), torch.arange(n))
    assert cache.capacity == 3 and cache.lengths == [2, 3, 4]
    keys = cache.keys[0][2, :, :4].clone()
    assert cache.remove(0) == 2  # the last row moves into the freed one
    assert cache.lengths == [4, 3] and torch.equal(cache.keys[0][0, :, :4], keys)
    assert cache.remove(1) is None and cache.lengths == [4]
    with pytest.raises(ValueError, match="tokens for 1 rows"):
        decode_step(model, cache, torch.tensor([1, 2]))


# ---- the engine ---------------------------------------------------------------------------------


class Collect:
    """A job's `emit`: the events, and a flag once every choice has finished."""

    def __init__(self, choices: int = 1) -> None:
        self.events: list[Event] = []
        self.open = choices
        self.done = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)
        self.open -= sum(e.finish_reason is not None for e in events)
        if self.open <= 0:
            self.done.set()

    def tokens(self, choice: int = 0) -> list[int]:
        return [p.token for e in self.events if e.choice == choice for p in e.pieces]


@pytest.fixture
def engine(model: GPT):
    engine = Engine(model, get_tokenizer(), 4, ENDOFTEXT_ID)
    engine.start()
    yield engine
    engine.close()


def test_more_requests_than_rows_wait_and_each_gets_generate_s_tokens(engine: Engine,
                                                                      model: GPT) -> None:
    prompts = [list(range(100 * i, 100 * i + 2 + i)) for i in range(7)]
    lengths = [30, 5, 17, 40, 9, 26, 3]  # past the context of 24 for some
    jobs = [Collect() for _ in prompts]
    for prompt, n, collect in zip(prompts, lengths, jobs, strict=True):
        engine.submit(Job(prompt, Sampling(max_tokens=n, temperature=0.0), collect))
    for prompt, n, collect in zip(prompts, lengths, jobs, strict=True):
        assert collect.done.wait(60)
        expected = generate(model, torch.tensor([prompt]), n, eos_id=ENDOFTEXT_ID)[0, len(prompt):]
        assert collect.tokens() == expected.tolist()
        assert collect.events[-1].finish_reason == "length"
        assert collect.events[-1].completion_tokens == n
    assert engine.stats()["active_sequences"] == 0


def test_a_cancelled_job_leaves_at_the_next_step(engine: Engine) -> None:
    collect = Collect()
    job = Job([1, 2, 3], Sampling(max_tokens=100_000, temperature=1.0), collect)
    engine.submit(job)
    while not collect.events:
        threading.Event().wait(0.01)
    job.cancelled = True
    for _ in range(500):
        if engine.stats()["active_sequences"] == 0:
            break
        threading.Event().wait(0.01)
    assert engine.stats()["active_sequences"] == 0 and not collect.done.is_set()


def test_a_failing_step_ends_its_jobs_with_an_error_and_the_engine_goes_on(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine_module, "prefill", broken)
    failed = Collect()
    engine.submit(Job([1, 2], Sampling(max_tokens=3, temperature=0.0), failed))
    assert failed.done.wait(30)
    assert failed.events[-1].error == "generation failed: RuntimeError: boom"
    monkeypatch.undo()
    fine = Collect()
    engine.submit(Job([1, 2], Sampling(max_tokens=3, temperature=0.0), fine))
    assert fine.done.wait(30) and len(fine.tokens()) == 3


# ---- text ---------------------------------------------------------------------------------------


def pieces(*texts: str) -> list[Piece]:
    return [Piece(i, text, text.encode()) for i, text in enumerate(texts)]


def run_filter(stops: list[str], texts: list[str]) -> tuple[str, bool]:
    stop_filter, out = StopFilter(stops), []
    for piece in pieces(*texts):
        released, stopped = stop_filter.push(piece)
        out += released
        if stopped:
            return "".join(p.text for p in out), True
    return "".join(p.text for p in out + stop_filter.finish()), False


@pytest.mark.parametrize(("stops", "texts", "expected"), [
    ([], ["a", "b"], ("ab", False)),
    (["\n\n"], ["Hello", "\n", "\n", "more"], ("Hello", True)),  # spans two tokens
    (["lo w"], ["Hel", "lo", " wor", "ld"], ("Hel", True)),  # starts inside a token
    (["xyz"], ["ab", "xy", "c"], ("abxyc", False)),  # held back, then released
    (["Hel"], ["Hello"], ("", True)),
    (["ab", "b"], ["xab"], ("x", True)),  # the earliest stop wins
])
def test_stop_strings(stops: list[str], texts: list[str], expected: tuple[str, bool]) -> None:
    assert run_filter(stops, texts) == expected


def test_a_character_split_across_tokens_comes_whole() -> None:
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("\N{SNOWMAN}\N{GRINNING FACE}")
    detok = Detokenizer(tokenizer)
    texts = [detok.piece(i).text for i in ids]
    assert "".join(texts) == "\N{SNOWMAN}\N{GRINNING FACE}" and "" in texts
    detok.piece(ids[-1] if len(ids) > 2 else ids[0])
    assert detok.flush() in ("", "\N{REPLACEMENT CHARACTER}")


# ---- prompts ------------------------------------------------------------------------------------


def test_chat_prompts_with_and_without_a_template(model: GPT) -> None:
    messages = [("system", "Answer briefly."), ("user", "2+2?"), ("assistant", "4"),
                ("user", "and <|endoftext|>?")]
    assert chat_prompt(messages, None) == ["Answer briefly.\n2+2?\n4\nand <|endoftext|>?"]
    segments = chat_prompt(messages, "qa")
    assert segments == ["Answer briefly.\n\n" + format_prompt("qa", "2+2?") + "4",
                        format_prompt("qa", "and <|endoftext|>?")]
    served = Served(model, "m", get_tokenizer(), "qa", 64, 4)
    ids = chat_ids(segments, served)
    assert ids.count(ENDOFTEXT_ID) == 1  # between the turns; the typed one stays text
    assert get_tokenizer().decode(ids[ids.index(ENDOFTEXT_ID) + 1:]) == segments[1]


def test_completion_prompts_in_each_form(model: GPT) -> None:
    served = Served(model, "m", get_tokenizer(), None, 64, 8)
    parsed = parse_completion({"model": "m", "prompt": ["a", [5, 6], ""], "n": 2}, served)
    assert parsed.prompts[1] == [5, 6] and parsed.prompts[2] == [ENDOFTEXT_ID]
    assert parsed.n == 2 and parsed.sampling.max_tokens == 16
    long = parse_completion({"model": "m", "prompt": list(range(100))}, served)
    assert long.prompts[0] == list(range(100 - CFG.context_length, 100))
    with pytest.raises(RequestError, match="3 prompts x n=3"):
        parse_completion({"model": "m", "prompt": ["a", "b", "c"], "n": 3}, served)
    with pytest.raises(RequestError, match="this server's limit"):
        parse_completion({"model": "m", "prompt": "a", "max_tokens": 65}, served)
