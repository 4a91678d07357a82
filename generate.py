"""Sample text from a trained checkpoint or from GPT-2 weights, streamed to the terminal.

    python generate.py                                     # the latest run under runs/
    python generate.py --prompt "The meaning of life" --temperature 0 --max-new-tokens 40
    python generate.py --init gpt2 --top-p 0.9 --num-samples 3 --seed 1
"""

from gpt.base.errors import run_cli
from gpt.cli.generate import main

if __name__ == "__main__":
    run_cli(main)
