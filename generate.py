"""Sample text from a trained checkpoint or from GPT-2 weights, streamed to the terminal.

    python generate.py                                     # the latest run under runs/
    python generate.py --prompt "The meaning of life" --temperature 0 --max-new-tokens 40
    python generate.py --init gpt2 --top-p 0.9 --num-samples 3 --seed 1
"""

import argparse
from pathlib import Path

from gpt.device import DTYPES
from gpt.errors import run_cli
from gpt.generate_cli import run_generation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample only among the k most likely tokens (default 50)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="then only within the nucleus of this probability mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    parser.add_argument("--num-samples", type=int, default=1, help="how many continuations (default 1)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, default=None, metavar="RUN_DIR",
                         help="a run directory (its best/, else last/) or a checkpoint directory; "
                              "default: the most recent run under runs/")
    weights.add_argument("--init", default=None, metavar="NAME_OR_PATH",
                         help="GPT-2 weights instead of a checkpoint: gpt2, gpt2-medium, ... or a path")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 (measured fastest for decoding, also on CPU), float16 on "
                             "GPUs without bf16; float32 for the exact trained weights")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole window for every token (slow; for checking)")
    parser.add_argument("--quantize", default="none", metavar="SCHEME",
                        help="weights for faster decoding: none (default), int8 (weight-only int8 in "
                             "every linear layer, the LM head included) or int8-no-head (the head "
                             "stays bfloat16); int8 needs bfloat16 on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model with frozen weights: 15-20 s once, then ~1.3x the "
                             "tokens/s on a CPU; pays for long or many samples (see BENCHMARKS.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_generation(**vars(parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
