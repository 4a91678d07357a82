"""gpt-serve against the official `openai` client on 127.0.0.1: the API, its equality with
generate.py, concurrent clients, and what it refuses."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra's httpx is not installed")
from serve_helpers import save_run, serve  # noqa: E402 - after the skips above

from gpt.checkpoints.checkpoint import load_checkpoint as load_model  # noqa: E402
from gpt.cli.generate import main as generate_main  # noqa: E402
from gpt.eval.explain import explain  # noqa: E402
from gpt.model.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "run"  # the served name: the run directory's


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def server(run_dir: Path, one_thread: None) -> Iterator[str]:
    with serve(run_dir) as (url, _, _):
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_generate_py(run_dir: Path, prompt: str, tokens: int, run_command) -> str:
    """What `generate.py` prints for `prompt`, greedy, float32."""
    result = run_command(generate_main, ["--checkpoint", str(run_dir), "--prompt", prompt,
                                         "--temperature", "0", "--max-new-tokens", str(tokens),
                                         "--dtype", "float32", "--device", "cpu"])
    assert result.status == 0, result.err
    return result.out


def test_models_and_health(client: openai.OpenAI, server: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch"] == 16


@pytest.mark.parametrize("tokens", [12, 45])  # 45: past the context of 32, the cache is re-filled
def test_greedy_completion_is_generate_py_s_text(client: openai.OpenAI, run_dir: Path, tokens: int,
                                                 run_command) -> None:
    prompt = "Every effort moves you"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0)
    choice = done.choices[0]
    assert greedy_generate_py(run_dir, prompt, tokens, run_command) == prompt + choice.text + "\n"
    assert choice.finish_reason == "length" and done.usage is not None
    assert done.usage.completion_tokens == tokens
    assert done.usage.prompt_tokens == len(get_tokenizer().encode(prompt))
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + choice.text


def test_a_seeded_sample_is_generate_py_s_with_the_same_seed(client: openai.OpenAI, run_dir: Path,
                                                             run_command) -> None:
    prompt = "Every effort moves you"
    result = run_command(generate_main, ["--checkpoint", str(run_dir), "--prompt", prompt,
                                         "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
                                         "--seed", "5", "--max-new-tokens", "15",
                                         "--dtype", "float32", "--device", "cpu"])
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0.9,
                                     top_p=0.95, seed=5, extra_body={"top_k": 20})
    assert result.out == prompt + done.choices[0].text + "\n"


def test_chat_without_a_template_continues_the_messages_joined_by_newlines(
        client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                          temperature=0)
    same = client.completions.create(model=MODEL, prompt="Be brief.\nHi", max_tokens=10,
                                     temperature=0)
    assert chat.choices[0].message.content == same.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens


def test_streams_what_a_whole_response_holds(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The sea", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="The sea", max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert len(chunks) == 21  # one per token, then the finish
    assert chunks[-1].usage.completion_tokens == 20  # on the last chunk, even unasked
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "The sea"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_n_choices_and_seeds(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        done = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, n=3,
                                         temperature=1.0, seed=seed, extra_body={"top_k": 40})
        assert [c.index for c in done.choices] == [0, 1, 2]
        assert done.usage.completion_tokens == 24
        return [c.text for c in done.choices]

    first = sample(7)
    assert sample(7) == first  # a seed repeats a sample
    assert len(set(first)) > 1  # choice i draws from seed + i
    assert sample(8) != first
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Once"}], max_tokens=8, n=3,
        temperature=1.0, seed=7, stream=True, extra_body={"top_k": 40})
    texts = ["", "", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == first


def test_top_k_extension_through_extra_body(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=2.0,
                                     seed=1, extra_body={"top_k": 1})
    greedy = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0)
    assert done.choices[0].text == greedy.choices[0].text  # top-1 is the argmax


def test_logprobs_are_the_models_probabilities(client: openai.OpenAI, run_dir: Path) -> None:
    prompt = "Every effort moves you"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt) + [tokenizer.encode_single_token(bytes(c.bytes))
                                      for c in content]
    explained = explain(load_model(run_dir / "best"), torch.tensor(ids), top=3).tokens
    for entry, position in zip(content, explained[-6:], strict=True):
        assert math.isclose(math.exp(entry.logprob), position.prob, rel_tol=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the first choice
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
        assert [math.exp(t.logprob) for t in entry.top_logprobs] == pytest.approx(
            [p for _, p in position.top], rel=1e-4)

    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     logprobs=2)
    lp = done.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([c.logprob for c in content], rel=1e-6)
    assert [len(t) for t in lp.top_logprobs] == [2] * 6
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == done.choices[0].text


def test_stop_strings_end_the_text_before_them(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = text[10:14]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0,
                                    stop=[stop, "never there \u2603"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_16_concurrent_clients_each_get_what_they_get_alone(client: openai.OpenAI) -> None:
    requests = [(f"Request {i}: " + "word " * (i % 5), 4 + 3 * i) for i in range(16)]

    def ask(request: tuple[str, int]) -> str:
        prompt, tokens = request
        done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens,
                                         temperature=0)
        assert done.usage.completion_tokens == tokens
        return done.choices[0].text

    alone = [ask(request) for request in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": 3}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [70000]}, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "does not exist"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 1}, "not supported"),
    ("/v1/completions", b'{"model": "run", "prompt": "x", "temperature": NaN}', "not valid JSON"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, "not supported"),
]


@pytest.mark.parametrize(("path", "body", "says"), BAD_REQUESTS)
def test_a_malformed_request_gets_a_400_with_an_error_object(server: str, path: str,
                                                             body: object, says: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text


def test_the_server_keeps_serving_after_bad_requests_and_refuses_the_rest(
        server: str, client: openai.OpenAI) -> None:
    for path, body, _ in BAD_REQUESTS[:4]:
        httpx.post(server + path, content=body if isinstance(body, bytes) else json.dumps(body))
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    huge = httpx.post(f"{server}/v1/completions", content=b" " * (2 << 20))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server}/v1/nothing").status_code == 404
    assert httpx.get(f"{server}/v1/completions").status_code == 405
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.total_tokens


def test_only_the_pages_own_files_are_served(server: str) -> None:
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<title>gpt-serve</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    script = httpx.get(server + "/static/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    for path in ("/static/../cli.py", "/static/%2e%2e/cli.py", "/static/cli.py", "/cli.py",
                 "/static/", "/index.html", "/static/static/app.js", "//etc/passwd"):
        assert httpx.get(server + path).status_code == 404, path


def test_a_client_that_goes_away_frees_its_sequence(server: str) -> None:
    body = {"model": MODEL, "prompt": "Far", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{server}/health").json()["active_sequences"] == 1
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/health").json()["active_sequences"]:
        assert time.monotonic() < deadline, "the sequence of a closed stream was not freed"
        time.sleep(0.05)

    with pytest.raises(httpx.ReadTimeout):  # a whole response: the client gives up waiting
        httpx.post(f"{server}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/health").json()["active_sequences"]:
        assert time.monotonic() < deadline, "the sequence of a dropped request was not freed"
        time.sleep(0.05)


def test_an_api_key_is_required_of_every_api_request(run_dir: Path) -> None:
    with serve(run_dir, "--max-batch", "2", api_key="s3cret") as (url, _, _):
        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code \
            == 401
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text
        assert httpx.get(f"{url}/").status_code == 200  # the page holds nothing to protect
