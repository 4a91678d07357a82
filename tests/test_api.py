"""The public API: what `import gpt` offers, with the signatures the issues name."""

import inspect

import gpt
from gpt.checkpoints import load, weights
from gpt.data import records
from gpt.data import windows as data
from gpt.eval import perplexity as evaluation
from gpt.model import loss, model, quantize, sampling
from gpt.training import settings, trainer


def test_exports_are_the_package_objects() -> None:
    assert gpt.GPT is model.GPT
    assert gpt.SlidingWindowDataset is data.SlidingWindowDataset
    assert gpt.create_dataloader is data.create_dataloader
    assert gpt.lm_loss is loss.lm_loss and gpt.perplexity is evaluation.perplexity
    assert gpt.generate is sampling.generate
    assert gpt.load_pretrained is weights.load_pretrained and gpt.save_hf is weights.save_hf
    assert gpt.quantize_int8 is quantize.quantize_int8 and gpt.prepack is quantize.prepack
    assert gpt.InstructionDataset is records.InstructionDataset and gpt.pad_collate is records.pad_collate  # noqa: E501
    assert gpt.load_records is records.load_records
    assert gpt.TrainConfig is settings.TrainConfig and gpt.train is trainer.train
    assert gpt.load_model is load.load_model
    assert all(hasattr(gpt, name) for name in gpt.__all__)


def parameters(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_signatures() -> None:
    assert parameters(gpt.SlidingWindowDataset) == ["token_ids", "context_length", "stride"]
    assert parameters(gpt.create_dataloader) == ["token_ids", "batch_size", "context_length",
                                                 "stride",
                                                 "shuffle", "drop_last", "seed", "num_workers",
                                                 "pin_memory"]
    assert parameters(gpt.lm_loss) == ["logits", "targets", "ignore_index", "label_smoothing"]
    assert parameters(gpt.generate) == ["model", "idx", "max_new_tokens", "temperature", "top_k",
                                        "top_p",
                                        "eos_id", "use_cache", "generator"]
    keyword_only = [name for name, p in inspect.signature(gpt.generate).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["temperature", "top_k", "top_p", "eos_id", "use_cache", "generator"]
    assert parameters(gpt.load_pretrained) == ["name_or_path", "overrides"]
    assert parameters(gpt.save_hf) == ["model", "out_dir"]
    assert parameters(gpt.quantize_int8) == ["model", "include_head"]
    assert parameters(gpt.InstructionDataset) == ["records", "tokenizer", "template", "mask_prompt",
                                                  "max_length"]
    assert parameters(gpt.pad_collate) == ["batch", "pad_id", "ignore_index"]
    assert parameters(gpt.load_records) == ["path"]
    assert parameters(gpt.load_model) == ["checkpoint_or_init", "device", "dtype"]
    assert parameters(gpt.train)[0] == "cfg"
