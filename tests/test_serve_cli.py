"""The gpt-serve command: its flags, the missing extra, the warning for other hosts, the run's
prompt template, and the real `python -m gpt.serve` process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra's httpx is not installed")
from serve_helpers import save_run, serve  # noqa: E402 - after the skips above

from gpt.checkpoints.checkpoint import TRAIN_STATE_FILE  # noqa: E402
from gpt.cli.generate import main as generate_main  # noqa: E402
from gpt.serve import cli  # noqa: E402
from gpt.training.settings import TrainConfig  # noqa: E402
from gpt.training.trainer import train  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("serve") / "run")


def test_the_console_script_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["gpt-serve"] == "gpt.serve.cli:cli"
    assert {"starlette>=0.37", "uvicorn>=0.29"} <= set(project["optional-dependencies"]["serve"])


def test_without_the_extra_one_line_names_the_install_command(
        run_dir: Path, run_command, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` raises ImportError
    line = run_command(cli.main, ["--checkpoint", str(run_dir)]).one_line_error()
    assert line == ('error: gpt-serve needs the serve extra (uvicorn is missing): '
                    'pip install -e ".[serve]"')


@pytest.mark.parametrize(("flags", "says"), [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--quantize", "int4"], "unknown --quantize 'int4'"),
    (["--dtype", "fp64"], "invalid choice"),
])
def test_bad_flags_fail_before_loading(run_dir: Path, run_command, flags: list[str],
                                       says: str) -> None:
    assert says in run_command(cli.main, ["--checkpoint", str(run_dir), *flags]).one_line_error()


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("192.168.1.5", None, True)])
def test_another_host_than_this_machine_without_a_key_is_warned_about(
        run_dir: Path, run_command, monkeypatch: pytest.MonkeyPatch, host: str, key: str | None,
        warned: bool) -> None:
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(kwargs))  # no socket
    flags = ["--checkpoint", str(run_dir), "--host", host, "--dtype", "float32", "--device", "cpu"]
    result = run_command(cli.main, flags + (["--api-key", key] if key else []))
    assert result.status == 0, result.err
    assert started == {"host": host, "port": 8000, "log_level": "warning"}
    assert ("no authentication" in result.err) == warned
    assert "serving 'run' on http://" in result.err


def test_chat_uses_the_fine_tuned_runs_template_as_generate_py_does(
        tmp_path: Path, run_command) -> None:
    run = save_run(tmp_path / "tuned", seed=3)
    # A real fine-tuning run's training state (its settings name the qa template), beside the
    # test's own weights: the template is read from the state, with --resume's checks.
    records = tmp_path / "qa.jsonl"
    records.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n"
                               for i in range(8)))
    with contextlib.redirect_stdout(io.StringIO()):  # its report is not what is compared below
        tuned = train(TrainConfig(data=str(records), preset="tiny", context_length=32, max_steps=1,
                                  eval_freq=1, eval_iters=1, eval_answers=0, sample_tokens=0,
                                  device="cpu", dtype="float32", out=str(tmp_path / "runs"),
                                  run_name="qa"))
    shutil.copy(tuned.run_dir / "best" / TRAIN_STATE_FILE, run / "best" / TRAIN_STATE_FILE)
    question = "What is the capital of France?"
    printed = run_command(generate_main, ["--checkpoint", str(run), "--prompt", question,
                                          "--temperature", "0", "--max-new-tokens", "20",
                                          "--dtype", "float32", "--device", "cpu"])
    assert printed.status == 0, printed.err
    with serve(run) as (url, served, _):
        assert served.template == "qa"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        chat = client.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": question}], max_tokens=20,
            temperature=0)
        completion = client.completions.create(
            model="tuned", prompt=f"Question: {question}\nAnswer: ", max_tokens=20, temperature=0)
    assert printed.out == chat.choices[0].message.content + "\n"  # only the answer is printed
    assert chat.choices[0].message.content == completion.choices[0].text
    with serve(run, "--raw") as (_, served, _):
        assert served.template is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_python_m_gpt_serve_serves_until_interrupted(run_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt.serve", "--checkpoint", str(run_dir), "--port", str(port),
         "--dtype", "float32", "--device", "cpu", "--max-batch", "2"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "gpt-serve did not start"
                time.sleep(0.2)
        assert health["status"] == "ok" and health["max_batch"] == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        assert client.completions.create(model="run", prompt="Hi", max_tokens=3).usage
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"serving 'run' on http://127.0.0.1:{port}/" in err and "Traceback" not in err
