"""gpt: a from-scratch GPT-2 pretraining framework in plain PyTorch."""

from gpt.config import GPTConfig
from gpt.data import SlidingWindowDataset, create_dataloader
from gpt.errors import UserError
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer

__all__ = [
    "GPT",
    "GPTConfig",
    "SlidingWindowDataset",
    "UserError",
    "create_dataloader",
    "get_tokenizer",
]
