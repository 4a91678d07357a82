"""Export a trained checkpoint as a Hugging Face GPT-2 directory: `python -m gpt.export RUN_DIR OUT_DIR`.

The result loads with `transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)` and gives the same
logits (see `gpt.weights.save_hf`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt.checkpoint import load_model, require_model_checkpoint
from gpt.errors import run_cli
from gpt.weights import save_hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path,
                        help="a run directory (its best/, else its last/, is exported) or a checkpoint")
    parser.add_argument("out_dir", type=Path, help="where to write config.json and model.safetensors")
    args = parser.parse_args(argv)
    save_hf(load_model(require_model_checkpoint(args.run_dir)), args.out_dir)
    print(f"wrote {args.out_dir}; transformers.GPT2LMHeadModel.from_pretrained('{args.out_dir}') loads it")


if __name__ == "__main__":
    run_cli(main)
