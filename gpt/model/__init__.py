"""The GPT: its settings (`config`), the layers (`model`), its loss (`loss`), the tokenizer,
decoding (`sampling`) and int8/bf16 decoding weights (`quantize`). Imports `gpt.base` only.
"""
