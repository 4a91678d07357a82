"""Weights on disk: the project's own format (`checkpoint`), background saves (`saver`),
OpenAI's and Hugging Face's GPT-2 (`weights`, `tf_checkpoint`), and loading a model for a command
(`load`). Imports `gpt.base`, `gpt.model`, `gpt.data`.
"""
