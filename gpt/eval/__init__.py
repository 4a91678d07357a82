"""Measuring a model: the loss over a loader and perplexity, a text's perplexity command
(`evaluate`), per-token explanations (`explain`), exact-match answers (`answers`), benchmark tasks:
multiple choice (`choice`), last-word accuracy (`last_word`), both during training (`tasks`), on
the shared batched scoring (`scoring`), and their command-line report (`task_cli`). Imports the
packages below it: `gpt.base`, `gpt.model`, `gpt.data`, `gpt.checkpoints`.
"""
