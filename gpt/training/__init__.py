"""The loop and what it needs: settings (`settings`), the loop (`trainer`), the optimizer and
schedule, resuming, the run directory, metrics and the printed report, torchrun. It knows no
objective by name: an objective (`gpt.objectives`) plugs in through `gpt.training.objective`.
Imports `gpt.base`, `gpt.model`, `gpt.data`, `gpt.checkpoints`, `gpt.eval`.
"""
