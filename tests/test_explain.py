"""`python -m gpt explain`: per-token losses against torch, a hand-made model, the arithmetic, the
CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from torch import Tensor, nn

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.eval.explain import explain, main, one_hot_arithmetic
from gpt.model.config import GPTConfig
from gpt.model.loss import lm_loss
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer


class Bigram(nn.Module):
    """A model whose next-token distribution depends only on the last token, given as a table."""

    def __init__(self, probs: list[list[float]], shift: float = 0.0) -> None:
        super().__init__()
        # (V, V): row = the token read
        self.logits = nn.Parameter(torch.tensor(probs).log() + shift)

    def forward(self, idx: Tensor) -> Tensor:
        return self.logits[idx]  # (B, T, V)


# After token 0, token 1 is likely; after token 1, token 2 is only the third choice.
PROBS = [[0.05, 0.60, 0.20, 0.15],
         [0.50, 0.10, 0.15, 0.25],
         [0.25, 0.25, 0.25, 0.25],
         [0.70, 0.10, 0.10, 0.10]]


def test_a_hand_made_model_gives_the_probabilities_ranks_and_top_tokens_of_its_table() -> None:
    result = explain(Bigram(PROBS, shift=3.0), torch.tensor([0, 1, 2, 0]), top=3)
    first, second, third = result.tokens
    assert (first.input, first.target, first.rank) == (0, 1, 1)
    assert first.prob == pytest.approx(0.60) and first.nll == pytest.approx(-math.log(0.60))
    assert [t for t, _ in first.top] == [1, 2, 3]
    assert [p for _, p in first.top] == pytest.approx([0.6, 0.2, 0.15])
    assert (second.input, second.target, second.rank) == (1, 2, 3)  # 0.50 and 0.25 come before 0.15
    assert second.prob == pytest.approx(0.15) and second.nll == pytest.approx(-math.log(0.15))
    assert [t for t, _ in second.top] == [0, 3, 2]
    assert third.prob == pytest.approx(0.25) and third.position == 2
    assert result.loss == pytest.approx(-(math.log(0.6) + math.log(0.15) + math.log(0.25)) / 3)


def test_the_arithmetic_of_the_first_position_shows_the_real_numbers() -> None:
    result = explain(Bigram(PROBS, shift=3.0), torch.tensor([0, 1, 2]))
    text = one_hot_arithmetic(result.first_logits, 1, ("' effort'", "'Every'"))
    # The logits are log p + 3, so log(sum exp z) is 3 and z[1] is log 0.6 + 3.
    assert "= z[k] - 3.0000" in text
    assert f"= z[1] - 3.0000 = {math.log(0.6) + 3:.4f} - 3.0000 = {math.log(0.6):.4f}" in text
    log_p = math.log(0.6)
    assert text.endswith(f"loss = -({log_p:.4f}) = {-log_p:.4f} = -log p(' effort') = -log 0.6")
    assert "1 at id 1, 0 at the other 3" in text


def test_per_token_losses_are_cross_entropy_and_their_mean_is_lm_loss() -> None:
    model = GPT(GPTConfig.preset("tiny", vocab_size=50, context_length=16))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # tied: sharper predictions than the init's near-uniform ones
    ids = torch.randint(0, 50, (12,))
    model.train()
    result = explain(model, ids, top=5)
    assert model.training  # put back, and dropout was off while explaining
    model.eval()
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    expected = F.cross_entropy(logits, ids[1:], reduction="none")
    nll = torch.tensor([t.nll for t in result.tokens])
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(torch.tensor([t.prob for t in result.tokens]), (-expected).exp())
    assert result.loss == pytest.approx(lm_loss(logits, ids[1:]).item(), rel=1e-6)
    assert result.loss == pytest.approx(expected.mean().item(), rel=1e-6)
    order = logits.argsort(dim=-1, descending=True)
    for i, token in enumerate(result.tokens):
        assert token.rank == 1 + order[i].tolist().index(int(ids[i + 1]))
        assert [t for t, _ in token.top] == order[i, :5].tolist()


def test_top_must_not_be_negative() -> None:
    with pytest.raises(UserError, match="--top must be 0 or more, got -1"):
        explain(Bigram(PROBS), torch.tensor([0, 1]), top=-1)


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/runs/x/best: a small model with GPT-2's vocabulary; the working directory is
    tmp_path."""
    monkeypatch.chdir(tmp_path)
    with atomic_directory(tmp_path / "runs" / "x" / "best") as tmp:
        save_model(GPT(GPTConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=1,
                                 drop_rate=0.0)), tmp)
    return tmp_path / "runs" / "x"


TEXT = "Every effort moves you"


def test_json_has_every_position_and_the_summary(run_dir: Path, run_command) -> None:
    status, out, err = run_command(main, ["--checkpoint", str(run_dir), "--text", TEXT, "--json",
                                          "--top", "2"])
    assert status == 0, err
    result = json.loads(out)
    tokenizer = get_tokenizer()
    ids = torch.tensor(tokenizer.encode(TEXT))
    with torch.no_grad():
        logits = load_checkpoint(run_dir / "best").eval()(ids[None, :-1])[0]
    expected = F.cross_entropy(logits, ids[1:], reduction="none")
    tokens = result["tokens"]
    assert [t["input"] for t in tokens] == ["Every", " effort", " moves"]
    assert [t["target"] for t in tokens] == [" effort", " moves", " you"]
    assert [t["nll"] for t in tokens] == pytest.approx(expected.tolist(), rel=1e-5)
    assert [t["prob"] for t in tokens] == pytest.approx((-expected).exp().tolist(), rel=1e-5)
    assert all(len(t["top"]) == 2 and t["rank"] >= 1 for t in tokens)
    assert result["summary"]["loss"] == pytest.approx(lm_loss(logits, ids[1:]).item(), rel=1e-5)
    assert result["summary"]["perplexity"] == pytest.approx(math.exp(result["summary"]["loss"]),
                                                            rel=1e-6)


def test_dtype_bfloat16_scores_under_autocast_like_torch(run_dir: Path, run_command) -> None:
    """--dtype is the shared model flag: bfloat16 runs the float32 weights under autocast, as
    evaluate does, and so gives torch.autocast's losses, not float32's (the default)."""
    argv = ["--text", TEXT, "--json", "--device", "cpu"]
    bf16 = json.loads(run_command(main, [*argv, "--dtype", "bfloat16"]).out)["tokens"]
    f32 = json.loads(run_command(main, argv).out)["tokens"]
    ids = torch.tensor(get_tokenizer().encode(TEXT))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = load_checkpoint(run_dir / "best").eval()(ids[None, :-1])[0]
    expected = F.cross_entropy(logits.float(), ids[1:], reduction="none").tolist()
    assert [t["nll"] for t in bf16] == pytest.approx(expected, rel=1e-5)
    assert [t["nll"] for t in f32] != pytest.approx(expected, rel=1e-5)


def test_the_table_has_a_line_per_position_the_mean_and_the_arithmetic(
        run_dir: Path, tmp_path: Path, run_command) -> None:
    (tmp_path / "text.txt").write_text(TEXT)
    loss = json.loads(run_command(main, ["--file", "text.txt", "--json"])[1])["summary"]["loss"]
    status, out, err = run_command(main, ["--file", "text.txt", "--plot", "tokens.png"])
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["pos", "input", "target"] and lines[0].endswith("top 3 "
                                                                                    "predictions")
    assert [line.split()[:3] for line in lines[1:4]] == [["0", "'Every'", "'"], ["1", "'",
                                                                                 "effort'"],
                                                         ["2", "'", "moves'"]]
    assert lines[4].startswith(f"mean loss {loss:.4f} over 3 predictions (= lm_loss of the same "
                               f"ids)")
    assert "position 0 by hand: after 'Every'" in out and "-log p(' effort')" in out
    assert imread(tmp_path / "tokens.png").shape[1] > 500


def test_a_text_longer_than_the_context_is_cut_with_a_note(run_dir: Path,
                                                           run_command) -> None:
    text = "one two three " * 10
    status, out, err = run_command(main, ["--text", text, "--json"])
    assert status == 0, err
    assert len(json.loads(out)["tokens"]) == 16  # the model's context length
    assert f"note: the text is {len(get_tokenizer().encode(text))} tokens; explaining the first 17" in err  # noqa: E501


@pytest.mark.parametrize(("argv", "message"), [
    (["--text", "Hello"], "the text is 1 token long; a loss needs at least two"),
    (["--text", ""], "the text is 0 tokens long; a loss needs at least two"),
    (["--file", "missing.txt"], "cannot read --file missing.txt: No such file or directory"),
    (["--file", "latin1.txt"], "--file latin1.txt is not UTF-8 text (invalid continuation byte at "
                               "byte 3)"),
    (["--text", TEXT, "--checkpoint", "nowhere"], "--checkpoint nowhere is neither a checkpoint "
                                                  "directory"),
    (["--text", TEXT, "--top", "-1"], "--top must be 0 or more, got -1"),
    (["--text", TEXT, "--plot", "no/such/dir/tokens.png"], "--plot no/such/dir/tokens.png: the "
                                                           "directory "),
    (["--text", TEXT, "--file", "x.txt"], "argument --file: not allowed with argument --text"),
    ([], "one of the arguments --text --file is required; see python -m gpt explain --help"),
    (["--text", TEXT, "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--text", TEXT, "--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA GPU"),
])
def test_bad_input_is_one_line_and_exit_status_2(run_dir: Path, tmp_path: Path,
                                                 run_command, argv: list[str],
                                                 message: str) -> None:
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    assert message in run_command(main, argv).one_line_error()
