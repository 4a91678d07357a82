"""`generate.py`: checkpoint discovery, flag checking, streamed text, and the real script's exit
codes."""

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.base.atomic import atomic_directory
from gpt.base.errors import run_cli
from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.checkpoints.load import find_checkpoint, load_from_flags
from gpt.cli.generate import main, write_text
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.sampling import generate
from gpt.model.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "generate.py"
_spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)

# GPT-2's vocabulary (the CLI speaks text), but small and untied so that greedy text varies.
CFG = GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                tie_embeddings=False)


def save_checkpoint(directory: Path) -> GPT:
    model = GPT(CFG).eval()
    with atomic_directory(directory) as tmp:
        save_model(model, tmp)
    return model


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/runs/x/best holding a tiny model; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "runs" / "x" / "best")
    return tmp_path / "runs" / "x"


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run generate.py's main in this process the way the script does: (exit status, stdout,
    stderr)."""
    try:
        run_cli(lambda: generate_script.main(argv))
        status = 0
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_greedy_cli_prints_the_prompt_and_the_models_continuation(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12", "--dtype",
            "float32"]
    status, out, err = cli(argv, capsys)
    assert status == 0, err
    model = load_checkpoint(run_dir / "best")
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode("Hello there")])
    expected = generate(model, prompt, 12, eos_id=50256)[0, prompt.size(1):].tolist()
    assert out == "Hello there" + tokenizer.decode(expected) + "\n"
    assert "runs/x/best" in err


def test_same_seed_same_text_and_samples_are_numbered(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--seed", "3", "--max-new-tokens", "15", "--num-samples", "2"]
    first, second = cli(argv, capsys)[1], cli(argv, capsys)[1]
    assert first == second
    assert first.count("--- sample ") == 2
    assert cli(["--seed", "4", "--max-new-tokens", "15"], capsys)[1] not in first


@pytest.mark.parametrize("which", ["run", "best", "last-only"])
def test_checkpoint_accepts_a_run_dir_or_a_checkpoint_dir(tmp_path: Path, which: str) -> None:
    run = tmp_path / "run"
    if which == "last-only":
        save_checkpoint(run / "last")
        assert find_checkpoint(run) == run / "last"
    else:
        save_checkpoint(run / "best")
        save_checkpoint(run / "last")
        path = run if which == "run" else run / "best"
        assert find_checkpoint(path) == run / "best"


def test_default_checkpoint_is_the_latest_runs_best(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "runs" / "old" / "best")
    save_checkpoint(tmp_path / "runs" / "new" / "best")
    assert find_checkpoint(None, tmp_path / "runs") == tmp_path / "runs" / "new" / "best"


def test_no_checkpoint_anywhere_says_to_train_or_init(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    status, _, err = cli([], capsys)
    assert status == 2
    assert err.startswith("error: no checkpoint") and err.count("\n") == 1
    assert "python train.py" in err and "--init" in err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "0"], "top_k"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--checkpoint", "no/such/dir"], "--checkpoint"),
        (["--device", "tpu9"], "--device"),
        # argparse's own errors: one line too, not its usage block (issue 30)
        (["--top-k", "1e30"],
         "argument --top-k: invalid int value: '1e30'; see python generate.py --help"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--checkpoint", "x", "--init", "gpt2"],
         "argument --init: not allowed with argument --checkpoint"),
        (["--foo"], "unrecognized arguments: --foo"),
        (["--quantize", "int4"], "--quantize"),
    ],
)
def test_bad_values_are_one_line_errors(run_dir: Path, capsys: pytest.CaptureFixture[str],
                                        argv: list[str], names: str) -> None:
    status, out, err = cli(argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err


def test_long_prompt_keeps_the_last_context_tokens(run_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "one two " * 40
    status, out, err = cli(["--prompt", prompt, "--max-new-tokens", "3"], capsys)
    assert status == 0
    n = len(get_tokenizer().encode(prompt))
    assert n > 32 and f"the prompt is {n} tokens; the model reads only the last 32" in err
    assert out.startswith(prompt)


def test_init_loads_gpt2_weights_through_load_pretrained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here: the weights can only come from --init
    asked = []

    def fake_load_pretrained(name_or_path: str) -> GPT:
        asked.append(name_or_path)
        return GPT(CFG)

    monkeypatch.setattr("gpt.checkpoints.load.load_pretrained", fake_load_pretrained)
    status, out, err = cli(["--init", "gpt2", "--max-new-tokens", "2"], capsys)
    assert status == 0, err
    assert asked == ["gpt2"] and out.startswith("Every effort moves you")


def test_text_is_written_only_in_whole_characters() -> None:
    tokenizer = get_tokenizer()
    text = "naïve café 🤖 日本語 done"
    tokens = tokenizer.encode(text)

    def is_utf8(data: bytes) -> bool:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    # The test means something only if some token is not whole characters by itself.
    assert not all(is_utf8(tokenizer.decode_single_token_bytes(t)) for t in tokens)
    writes = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

    write_text(tokens, tokenizer, Recorder())
    assert "".join(writes) == text
    assert len([w for w in writes if w]) > 5  # streamed piece by piece, not at the end
    assert all("\ufffd" not in w for w in writes)


def test_the_script_end_to_end(tmp_path: Path) -> None:
    """The real `python generate.py`: the default checkpoint works, an error exits 2 without a
    traceback (a bad flag's error is `main`'s, checked in this process above)."""
    save_checkpoint(tmp_path / "with" / "runs" / "x" / "best")
    (tmp_path / "empty" / "runs").mkdir(parents=True)

    def script(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=120)

    ok = script(tmp_path / "with", "--temperature", "0.8", "--top-k", "50", "--max-new-tokens", "5")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Every effort moves you") and "Traceback" not in ok.stderr
    bad = script(tmp_path / "empty")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_the_root_script_only_calls_the_package_command(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`generate.py` is `gpt.cli.generate.main`; `python -m gpt.cli.generate` is the same command.
    """
    assert generate_script.main is main
    save_checkpoint(tmp_path / "runs" / "x" / "best")
    args = ["--seed", "5", "--max-new-tokens", "6", "--dtype", "float32"]

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True,
                              text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})

    as_module = run("-m", "gpt.cli.generate", *args)
    monkeypatch.chdir(tmp_path)
    status, as_script, err = cli(args, capsys)  # what the script runs, in this process
    assert as_module.returncode == 0 and status == 0, as_module.stderr + err
    assert as_module.stdout == as_script and as_script.startswith("Every effort moves you")
    bad = run("-m", "gpt.cli.generate", "--top-p", "2")
    assert bad.returncode == 2
    assert bad.stderr == "error: top_p must be in (0, 1] (1 keeps every token), got 2.0\n"


def test_compile_flag_compiles_the_loaded_model(
        run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile hands the loaded model to `compile_for_decoding` and samples with what it returns
    (whose decoding is tested in test_sampling.py; here a stand-in avoids the compile time)."""
    compiled = []

    def stand_in(model):
        compiled.append(model)
        return model

    monkeypatch.setattr("gpt.cli.generate.compile_for_decoding", stand_in)
    argv = ["--seed", "3", "--max-new-tokens", "15"]
    status, out, _ = cli([*argv, "--compile"], capsys)
    assert status == 0 and len(compiled) == 1 and compiled[0].config.n_layers > 0
    assert out == cli(argv, capsys)[1]


def test_a_failed_compile_is_one_line_naming_the_fix(
        run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    class CannotCompile(torch.nn.Module):  # what inductor does at the first call without a compiler
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config, self.new_kv_cache = model.config, model.new_kv_cache

        def forward(self, *args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                lambda *_: None, RuntimeError("InvalidCxxCompiler: No working C++ compiler found"),
                None)

    monkeypatch.setattr("gpt.cli.generate.compile_for_decoding", CannotCompile)
    status, _, err = cli(["--compile", "--max-new-tokens", "5"], capsys)
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: --compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler "
        "found); run without --compile (it needs a working C++ compiler on a CPU, and Triton on a "
        "GPU)")



def test_the_device_is_configured_and_the_weights_cast_on_the_cpu_before_they_move(
        run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:N becomes the current GPU (`configure_device`), and float32 weights never reach the
    device: loaded on the CPU, cast there, then moved (the "meta" device stands in for a GPU)."""
    configured, loaded_on, moved = [], [], []
    monkeypatch.setattr("gpt.cli.generate.configure_device", configured.append)

    def load(path, device="cpu", **overrides):
        loaded_on.append(torch.device(device))
        return load_checkpoint(path, device, **overrides)

    monkeypatch.setattr("gpt.checkpoints.weights.load_checkpoint", load)  # what --checkpoint reads
    original_to = GPT.to

    def to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        weight = next(result.parameters())
        moved.append((weight.device.type, weight.dtype))
        return result

    monkeypatch.setattr(GPT, "to", to)
    model = load_from_flags(run_dir / "best", None, torch.device("meta"), torch.bfloat16,
                            io.StringIO())
    assert loaded_on == [torch.device("cpu")]
    assert moved[-1] == ("meta", torch.bfloat16) and ("meta", torch.float32) not in moved
    assert next(model.parameters()).device.type == "meta"
    assert cli(["--max-new-tokens", "2", "--device", "cpu"], capsys)[0] == 0
    assert configured == [torch.device("cpu")]


def test_out_of_memory_while_generating_is_one_line_naming_the_fix(
        run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a "
                                     "total capacity of 15.77 GiB of which 3.12 MiB is free.")

    monkeypatch.setattr("gpt.cli.generate.stream", out_of_memory)
    status, _, err = cli(["--max-new-tokens", "5"], capsys)
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: out of memory (CUDA out of memory. Tried to allocate 20.00 MiB); use --dtype auto, "
        "bfloat16 or float16 (half float32's memory), a smaller model, or --device cpu")
