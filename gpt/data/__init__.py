"""What a model trains on: text sources and their downloads (`corpora`), the token cache, the
sliding windows (`windows`), question-answer records (`records`) and preference pairs (`pairs`).
Imports `gpt.base` and `gpt.model`.
"""
