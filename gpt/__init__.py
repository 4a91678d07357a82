"""gpt: a from-scratch GPT-2 pretraining framework in plain PyTorch."""

import gpt.objectives  # noqa: F401 (importing registers the built-in objectives: --objective lm, dpo, grpo)
from gpt.base.errors import UserError
from gpt.checkpoints.load import load_model
from gpt.checkpoints.weights import load_pretrained, save_hf
from gpt.data.records import InstructionDataset, load_records, pad_collate
from gpt.data.windows import SlidingWindowDataset, create_dataloader
from gpt.eval.perplexity import evaluate_loss, perplexity
from gpt.model.config import GPTConfig
from gpt.model.lora import LoRASettings, add_lora, merge_lora
from gpt.model.loss import lm_loss
from gpt.model.model import GPT
from gpt.model.quantize import prepack, quantize_int8
from gpt.model.sampling import generate, stream
from gpt.model.tokenizer import get_tokenizer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import train

__all__ = [
    "GPT",
    "GPTConfig",
    "InstructionDataset",
    "LoRASettings",
    "SlidingWindowDataset",
    "TrainConfig",
    "UserError",
    "add_lora",
    "create_dataloader",
    "evaluate_loss",
    "generate",
    "get_tokenizer",
    "lm_loss",
    "load_model",
    "load_pretrained",
    "load_records",
    "merge_lora",
    "pad_collate",
    "perplexity",
    "prepack",
    "quantize_int8",
    "save_hf",
    "stream",
    "train",
]
