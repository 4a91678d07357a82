"""gpt: a from-scratch GPT-2 pretraining framework in plain PyTorch."""

from gpt.config import GPTConfig
from gpt.data import SlidingWindowDataset, create_dataloader
from gpt.errors import UserError
from gpt.loss import evaluate_loss, lm_loss, perplexity
from gpt.model import GPT
from gpt.quantize import prepack, quantize_int8
from gpt.records import InstructionDataset, load_records, pad_collate
from gpt.sampling import generate, stream
from gpt.tokenizer import get_tokenizer
from gpt.weights import load_pretrained, save_hf

__all__ = [
    "GPT",
    "GPTConfig",
    "InstructionDataset",
    "SlidingWindowDataset",
    "UserError",
    "create_dataloader",
    "evaluate_loss",
    "generate",
    "get_tokenizer",
    "lm_loss",
    "load_pretrained",
    "load_records",
    "pad_collate",
    "perplexity",
    "prepack",
    "quantize_int8",
    "save_hf",
    "stream",
]
