"""`python -m gpt <command> [flags]`: the commands of `gpt.cli.COMMANDS`, bad input in one line."""

from gpt.base.errors import run_cli
from gpt.cli import main

if __name__ == "__main__":
    run_cli(main)
