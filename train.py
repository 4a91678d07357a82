"""Pretrain a GPT from the command line: `python train.py --help` lists every flag.

With no flags it trains the `mini` preset on the built-in corpus (offline, a few minutes on a CPU) and
writes runs/<start time>/ with metrics.csv, loss.png and the checkpoints best/ and last/.
"""

from gpt.train_cli import cli

if __name__ == "__main__":
    cli()
