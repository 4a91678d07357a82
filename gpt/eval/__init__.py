"""Measuring a model: the loss over a loader and perplexity, a text's perplexity command
(`evaluate`), per-token explanations (`explain`), exact-match answers (`answers`). Imports the
packages below it: `gpt.base`, `gpt.model`, `gpt.data`, `gpt.checkpoints`.
"""
