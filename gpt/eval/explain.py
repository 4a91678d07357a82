"""The loss token by token: `python -m gpt explain --checkpoint RUN_DIR --text "Every effort"`.

At every position the model reads the tokens so far and gives a probability to each of the V tokens
that could come next. The loss of that position is -log p(the token that does come next): 0 when the
model was sure and right, large when it gave the right token little probability. The mean over the
positions is the loss `train.py` reports (`gpt.model.loss.lm_loss`), and exp(mean) the perplexity.

For each position this prints the input token, the target (the next token), p(target), its loss, the
target's rank among the V predictions (1 = the model's first choice) and the top predictions; then
the mean and the perplexity, and for the first position the same loss written the way a learner
computes it, with the one-hot target. `--plot` draws the text coloured by loss, `--json` prints it
all as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.base.device import autocast, eval_mode, pick_device, training_dtype
from gpt.base.errors import ArgumentParser, UserError, command_name, run_cli
from gpt.base.plot import plot_token_losses
from gpt.checkpoints.load import add_model_flags, load_from_flags
from gpt.eval.evaluate import require_two_tokens
from gpt.eval.perplexity import perplexity
from gpt.model.loss import lm_loss
from gpt.model.tokenizer import ENDOFTEXT, get_tokenizer


@dataclass(frozen=True)
class TokenLoss:
    """What the model made of one position."""

    position: int
    """Index of the input token in the text (0 = the first token)."""
    input: int
    """The token read at this position (the last one the model sees)."""
    target: int
    """The token that comes next: the one the model should predict."""
    prob: float
    """The model's probability of the target: softmax(logits)[target]."""
    nll: float
    """The position's loss: -log prob, in nats."""
    rank: int
    """1 + the number of tokens the model found more likely than the target (1 = its first choice).
    """
    top: list[tuple[int, float]]
    """The most likely next tokens, with their probabilities, most likely first."""


@dataclass(frozen=True)
class Explanation:
    """What the model made of a whole text."""

    tokens: list[TokenLoss]
    loss: float
    """`lm_loss` of the same ids: the mean of the tokens' nll."""
    first_logits: Tensor
    """The logits at position 0, (V,), for the learner's arithmetic (`one_hot_arithmetic`)."""


def explain(model: nn.Module, ids: Tensor, top: int = 3) -> Explanation:
    """Score the 1-D token ids `ids` (on the model's device) with `model`: ids[:-1] are the inputs,
    ids[1:] the targets. The model runs in eval mode without gradients (and is put back as it
    was)."""
    require_two_tokens(ids.numel())
    if top < 0:
        raise UserError(f"--top must be 0 or more, got {top}")
    inputs, targets = ids[:-1], ids[1:].cpu()
    with eval_mode(model), torch.no_grad():
        logits = model(inputs[None])[0].float().cpu()  # (T, V)
    logp = F.log_softmax(logits, dim=-1)
    logp_target = logp.gather(1, targets[:, None])  # (T, 1)
    ranks = (logp > logp_target).sum(dim=-1) + 1
    top_logp, top_ids = logp.topk(min(top, logp.size(-1)), dim=-1)
    tokens = [
        TokenLoss(position=i, input=int(inputs[i]), target=int(targets[i]),
                  prob=float(logp_target[i].exp()),
                  nll=-float(logp_target[i]), rank=int(ranks[i]),
                  top=[(int(t), float(p)) for t, p in zip(top_ids[i], top_logp[i].exp(),
                                                          strict=True)])
        for i in range(len(targets))
    ]
    return Explanation(tokens, float(lm_loss(logits, targets)), logits[0])


def one_hot_arithmetic(logits: Tensor, target: int, names: tuple[str, str]) -> str:
    """The loss of one position computed the way a learner writes it, with the real numbers.

    y is the one-hot target (1 at `target`, 0 elsewhere); the loss is -sum_k y[k] *
    log_softmax(z)[k], and since only y[target] is not zero, that sum is log_softmax(z)[target] =
    -log p(target). `names` = (the target token as text, the input token as text).
    """
    z = logits.double()
    log_norm = float(torch.logsumexp(z, dim=0))
    y = F.one_hot(torch.tensor(target), z.numel()).double()
    summed = float((y * F.log_softmax(z, dim=0)).sum())  # the sum itself, not a shortcut
    target_name, input_name = names
    return "\n".join([
        f"position 0 by hand: after {input_name}, z = the {z.numel()} logits,",
        f"  y = the one-hot vector of the target {target_name} (1 at id {target}, 0 at the other "
        f"{z.numel() - 1})",
        f"  log_softmax(z)[k] = z[k] - log(sum_j exp(z[j])) = z[k] - {log_norm:.4f}",
        f"  sum_k y[k] * log_softmax(z)[k] = z[{target}] - {log_norm:.4f} = {float(z[target]):.4f} "
        f"- {log_norm:.4f} = {summed:.4f}",
        f"  loss = -({summed:.4f}) = {-summed:.4f} = -log p({target_name}) = -log "
        f"{math.exp(summed):.6g}",
    ])


def token_text(tokenizer: tiktoken.Encoding, token: int) -> str:
    """A token as the text it stands for (bytes of a character split across tokens show as U+FFFD).
    """
    return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    """The command's flags: the model's (`add_model_flags`; --dtype is the autocast precision, by
    default float32, whose losses the table's arithmetic reproduces), the text's, the output's."""
    parser = ArgumentParser(prog=command_name("python -m gpt explain"),
                            description=__doc__.splitlines()[0])
    add_model_flags(parser, dtype_default="float32")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to explain")
    text.add_argument("--file", type=Path, help="a UTF-8 text file to explain")
    parser.add_argument("--top", type=int, default=3, help="top predictions to show per position "
                                                           "(default 3)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the text coloured by "
                                                                      "loss")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the "
                                                            "table")
    return parser


def read_text(args: argparse.Namespace) -> str:
    """The text of --text, or of the --file."""
    if args.text is not None:
        return str(args.text)
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read --file {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--file {args.file} is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start})") from None


def main(argv: list[str] | None = None) -> None:
    """`python -m gpt explain ...`: check the flags and the text, load the model, explain, print."""
    args = build_parser().parse_args(argv)
    if args.plot is not None and not args.plot.absolute().parent.is_dir():
        raise UserError(f"--plot {args.plot}: the directory {args.plot.absolute().parent} does not "
                        f"exist")
    if args.plot is not None and args.plot.is_dir():
        raise UserError(f"--plot {args.plot} is a directory; give a file to draw to, e.g. "
                        f"--plot {args.plot / 'losses.png'}")
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(read_text(args), allowed_special={ENDOFTEXT})
    device = pick_device(args.device)
    dtype = training_dtype(args.dtype, device)
    model = load_from_flags(args.checkpoint, args.init, device, torch.float32, sys.stderr)
    if max(ids, default=0) >= model.config.vocab_size:
        raise UserError(f"the text has token id {max(ids)} but the model predicts only "
                        f"{model.config.vocab_size} ids; it was not trained with the GPT-2 "
                        f"tokenizer")
    if len(ids) > model.config.context_length + 1:
        print(f"note: the text is {len(ids)} tokens; explaining the first "
              f"{model.config.context_length + 1} "
              "(the model reads at most its context length)", file=sys.stderr)
        ids = ids[:model.config.context_length + 1]
    with autocast(device, dtype):
        result = explain(model, torch.tensor(ids, device=device), args.top)
    names = [token_text(tokenizer, i) for i in ids]
    if args.plot is not None:
        title = f"loss per token: mean {result.loss:.3f}, perplexity {perplexity(result.loss):.1f}"
        plot_token_losses(names, [t.nll for t in result.tokens], args.plot, title=title)
    if args.json:
        print(json.dumps(to_json(result, tokenizer)))
    else:
        print_table(result, tokenizer, args.top)
        first = result.tokens[0]
        print(one_hot_arithmetic(result.first_logits, first.target,
                                 (repr(names[1]), repr(names[0]))))
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr)


def to_json(result: Explanation, tokenizer: tiktoken.Encoding) -> dict[str, Any]:
    def token(t: TokenLoss) -> dict[str, Any]:
        return {**asdict(t), "input": token_text(tokenizer, t.input), "input_id": t.input,
                "target": token_text(tokenizer, t.target), "target_id": t.target,
                "top": [{"token": token_text(tokenizer, i), "id": i, "prob": p} for i, p in t.top]}

    return {"tokens": [token(t) for t in result.tokens],
            "summary": {"loss": result.loss, "perplexity": perplexity(result.loss),
                        "tokens": len(result.tokens)}}


def print_table(result: Explanation, tokenizer: tiktoken.Encoding, top: int) -> None:
    def shown(token: int, width: int) -> str:
        text = repr(token_text(tokenizer, token))
        return text if len(text) <= width else text[:width - 1] + "…"

    print(f"{'pos':>4}  {'input':<14} {'target':<14} {'p(target)':>10} {'loss':>7} {'rank':>6}  "
          f"top {top} predictions")
    for t in result.tokens:
        predictions = "  ".join(f"{shown(i, 14)} {p:.3f}" for i, p in t.top)
        print(f"{t.position:>4}  {shown(t.input, 14):<14} {shown(t.target, 14):<14} "
              f"{t.prob:>10.4g} "
              f"{t.nll:>7.3f} {t.rank:>6}  {predictions}")
    print(f"mean loss {result.loss:.4f} over {len(result.tokens)} predictions (= lm_loss of the "
          f"same ids), perplexity exp({result.loss:.4f}) = {perplexity(result.loss):.2f}")
    print()


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
