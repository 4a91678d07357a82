"""Pretrain a GPT from the command line: `python train.py --help` lists every flag.

With no flags it trains the `mini` preset on the built-in corpus (offline, a few minutes on a CPU)
and writes runs/<start time>/ with metrics.csv, loss.png and the checkpoints best/ and last/.
"""

from gpt.base.errors import run_cli
from gpt.cli.train import main

if __name__ == "__main__":
    run_cli(main)
