"""`python -m gpt.serve`: the `gpt-serve` command."""

from gpt.base.errors import run_cli
from gpt.serve.cli import main

if __name__ == "__main__":
    run_cli(main)
