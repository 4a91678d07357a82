"""`python -m gpt evaluate`: the sliding windows, perplexity against Hugging Face, bits per byte,
the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.checkpoints.weights import save_hf
from gpt.data.token_cache import load_tokens
from gpt.data.windows import SlidingWindowDataset
from gpt.eval.evaluate import Windows, main, scored_bytes, sliding_window_nll
from gpt.eval.perplexity import evaluate_loss
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT, get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def sharpened(model: GPT) -> GPT:
    """`model` with its weights pushed away from the init, so that its predictions are far from
    uniform and depend on the context (a wrong window would give another loss, not the same ~log
    V)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def random_model(vocab_size: int = 97, context_length: int = 16) -> GPT:
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=2,
                    n_layers=2,
                    drop_rate=0.0)
    return sharpened(GPT(cfg))


def hf_sliding_window_nll(hf: GPT2LMHeadModel, ids: torch.Tensor, L: int, S: int) -> tuple[float,
                                                                                           int]:
    """The procedure of Hugging Face's perplexity guide, one window at a time, with a window of L
    inputs predicting the L tokens after them: (summed nll in nats, tokens scored)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), S):
        end = min(begin + L, len(ids) - 1)  # the window's last target
        new = end - prev_end  # targets no earlier window scored
        targets = ids[begin + 1:end + 1].clone()
        targets[:len(targets) - new] = -100
        with torch.no_grad():
            logits = hf(ids[None, begin:end]).logits[0]
        total += F.cross_entropy(logits.double(), targets, ignore_index=-100,
                                 reduction="sum").item()
        count += new
        prev_end = end
        if end == len(ids) - 1:
            break
    return total, count


@pytest.mark.parametrize(("n_tokens", "L", "S"), [(300, 4, 4), (301, 16, 16), (300, 7, 3), (37, 10,
                                                                                            9),
                                                  (12, 20, 5), (2, 1, 1)])
def test_every_token_but_the_first_is_scored_once_by_the_window_with_the_most_context(
        n_tokens: int, L: int, S: int) -> None:
    scored: dict[int, int] = {}  # target position -> the start of the window that scored it
    for span in Windows(L, S).spans(n_tokens):
        assert 1 <= span.inputs <= L and 1 <= span.scored <= span.inputs
        for j in range(span.inputs - span.scored, span.inputs):
            target = span.start + 1 + j
            assert target not in scored
            scored[target] = span.start
    assert sorted(scored) == list(range(1, n_tokens))
    for target, start in scored.items():
        # The windows start at 0, S, 2S, ...; the one with the most context for a target is the
        # first that still reaches it (start + L >= target).
        assert start == min(b for b in range(0, n_tokens, S) if b + L >= target)


@pytest.mark.parametrize(("L", "S", "batch_size"), [(16, 16, 3), (16, 5, 3), (16, 1, 8), (9, 4, 1)])
def test_perplexity_matches_the_same_procedure_with_transformers(
        tmp_path: Path, L: int, S: int, batch_size: int) -> None:
    model = random_model(context_length=16)
    save_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (70,))  # 69 targets: the last window is a short one for every L
    nll, tokens = sliding_window_nll(model, ids.numpy(), Windows(L, S, batch_size))
    expected_nll, expected_tokens = hf_sliding_window_nll(hf, ids, L, S)
    assert tokens == expected_tokens == 69
    assert nll == pytest.approx(expected_nll, rel=1e-4)


def test_overlapping_windows_give_another_loss_than_disjoint_ones() -> None:
    model, ids = random_model(), torch.randint(0, 97, (200,))
    disjoint = sliding_window_nll(model, ids, Windows(16, 16))[0]
    overlapping = sliding_window_nll(model, ids, Windows(16, 4))[0]
    assert abs(disjoint - overlapping) > 1e-3 * disjoint  # the test above can tell them apart


def test_stride_equal_to_the_context_is_evaluate_loss_over_disjoint_windows() -> None:
    model, L = random_model(), 16
    ids = torch.randint(0, 97, (10 * L + 1,))  # exactly 10 windows of L inputs and L targets
    loader = DataLoader(SlidingWindowDataset(ids, L, L), batch_size=4)
    nll, tokens = sliding_window_nll(model, ids, Windows(L, L, batch_size=3))
    assert tokens == 10 * L
    assert nll / tokens == pytest.approx(evaluate_loss(model, loader), rel=1e-6)


def test_windows_read_a_memmap_and_leave_the_model_in_its_mode(tmp_path: Path) -> None:
    model, ids = random_model(), np.random.default_rng(0).integers(0, 97, 150).astype(np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    memmap = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    model.train()
    assert sliding_window_nll(model, memmap, Windows(16, 8)) == sliding_window_nll(model, ids,
                                                                                   Windows(16, 8))
    assert model.training


def test_scored_bytes_are_the_utf8_bytes_of_the_text_after_the_first_token() -> None:
    tokenizer = get_tokenizer()
    text = f"Hello world.{ENDOFTEXT}Ünïcode ✓ and 日本語, split across tokens."
    ids = np.array(tokenizer.encode(text, allowed_special={ENDOFTEXT}), dtype=np.uint16)
    scored_text = tokenizer.decode(ids[1:].tolist()).replace(ENDOFTEXT, "")
    assert scored_bytes(ids, tokenizer) == len(scored_text.encode("utf-8"))
    assert scored_bytes(ids, tokenizer, chunk=3) == scored_bytes(ids, tokenizer)  # chunks add up


@pytest.mark.parametrize(("L", "S", "match"), [(8, 9, "--stride must be between 1 and "
                                                      "--context-length"),
                                               (8, 0, "--stride must be between 1"),
                                               (0, 1, "--context-length must be at least 1")])
def test_bad_windows_are_refused(L: int, S: int, match: str) -> None:
    with pytest.raises(UserError, match=match):
        Windows(L, S)


def test_a_text_of_one_token_cannot_be_scored() -> None:
    with pytest.raises(UserError, match="1 token long; a loss needs at least two"):
        sliding_window_nll(random_model(), torch.tensor([5]), Windows(4, 4))


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/runs/x/best: a small model with GPT-2's vocabulary (the CLI scores GPT-2 tokens)."""
    monkeypatch.chdir(tmp_path)
    model = sharpened(GPT(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1,
                                    drop_rate=0.0)))
    with atomic_directory(tmp_path / "runs" / "x" / "best") as tmp:
        save_model(model, tmp)
    return tmp_path / "runs" / "x"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "story.txt"
    path.write_text("I had always thought Jack Gisburn rather a cheap genius, though a good "
                    "fellow. " * 6)
    return path


def test_json_reports_the_transformers_perplexity_and_bits_per_byte(
        run_dir: Path, text_file: Path, tmp_path: Path, run_command) -> None:
    status, out, err = run_command(main, ["--checkpoint", str(run_dir), "--data", str(text_file),
                                          "--context-length", "24", "--stride", "10", "--dtype",
                                          "float32",
                                          "--json"])
    assert status == 0, err
    result = json.loads(out)
    ids = torch.from_numpy(load_tokens(str(text_file)).astype(np.int64))
    save_hf(load_checkpoint(run_dir / "best"), tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    nll, tokens = hf_sliding_window_nll(hf, ids, 24, 10)
    assert result["tokens"] == tokens == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    text_bytes = len(text_file.read_bytes()) - len(get_tokenizer().decode_single_token_bytes(int(ids[0])))  # noqa: E501
    assert result["bytes"] == text_bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-4)


def test_the_table_prints_the_same_numbers(run_dir: Path, text_file: Path,
                                           run_command) -> None:
    argv = ["--data", str(text_file), "--dtype", "float32"]  # the latest run; L = 32, S = 16
    result = json.loads(run_command(main, [*argv, "--json"])[1])
    status, out, err = run_command(main, argv)
    assert status == 0, err
    assert "windows of 32 every 16" in out
    assert f"tokens scored  {result['tokens']:,}" in out
    assert f"mean loss      {result['loss']:.4f} nats per token" in out
    assert f"perplexity     {result['perplexity']:.2f}" in out
    assert f"bits per byte  {result['bits_per_byte']:.4f}" in out
    assert "runs/x/best" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "nowhere"], "--checkpoint nowhere is neither a checkpoint directory"),
    (["--init", "nowhere"], "'nowhere' is neither a file or directory nor a known model"),
    (["--data", "missing.txt"], "'missing.txt' is not an existing file, directory, glob or corpus "
                                "name"),
    (["--data", "one.txt"], "the text is 1 token long; a loss needs at least two"),
    (["--stride", "33"], "--stride must be between 1 and --context-length (32)"),
    (["--context-length", "8", "--stride", "9"], "--stride must be between 1 and --context-length "
                                                 "(8)"),
    (["--stride", "0"], "--stride must be between 1 and --context-length"),
    (["--context-length", "64"], "--context-length 64 exceeds the model's context length 32"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--stride", "x"],
     "argument --stride: invalid int value: 'x'; see python -m gpt evaluate --help"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--checkpoint", "x", "--init", "gpt2"],
     "argument --init: not allowed with argument --checkpoint"),
    ([], "the following arguments are required: --data"),
])
def test_bad_input_is_one_line_and_exit_status_2(run_dir: Path, text_file: Path, tmp_path: Path,
                                                 run_command, argv: list[str],
                                                 message: str) -> None:
    (tmp_path / "one.txt").write_text("Hello")
    if argv and "--data" not in argv:
        argv = [*argv, "--data", str(text_file)]
    assert message in run_command(main, argv).one_line_error()


def test_the_module_runs_as_a_command(run_dir: Path, text_file: Path) -> None:
    command = [sys.executable, "-m", "gpt.eval.evaluate", "--checkpoint", str(run_dir),
               "--data", str(text_file), "--stride", "40"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir.parent.parent,
                          env={"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: --stride must be between 1 and "
                                                    "--context-length (32), got 40; a stride above "
                                                    "it would skip tokens")
