"""GPT-2 weights: load the published checkpoints into our `GPT`, and export ours for Hugging Face.

`load_pretrained(name_or_path, **overrides)` reads

- a Hugging Face GPT-2 directory: `config.json` + `model.safetensors` (or `pytorch_model.bin`), as
  published for `openai-community/gpt2`, `gpt2-medium`, `gpt2-large` and `gpt2-xl`;
- a lone `.safetensors` (or `.bin`) file in HF names, its size inferred from the tensor shapes;
- OpenAI's original release directory (`hparams.json`, `checkpoint`, `model.ckpt.index`,
  `model.ckpt.data-00000-of-00001`), read without TensorFlow by `gpt.checkpoints.tf_checkpoint`;
- a checkpoint of this project (`config.json` in our field names + `model.safetensors`), or a run
  directory, whose `best/` (else `last/`) is read: by `gpt.checkpoints.checkpoint.load_checkpoint`,
  as `--resume` reads it, with the same checks; a LoRA run's is its base with the adapters merged
  (`gpt.checkpoints.lora`);
- a model name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, with or without
`openai-community/`),
  downloaded from the Hugging Face hub with the optional `huggingface_hub` package.

All formats go through one table, `KEY_MAP` (`gpt.checkpoints.key_map`): one row per tensor, with
its name in each format and whether it is a Conv1D kernel. Our attention keeps q, k and v fused in
one projection, in the same order as `c_attn`, so no split is needed; GPT-2 has a qkv bias
(`qkv_bias=True`) and a head tied to the token embedding, which is therefore not stored. The
conversions work on tensors as the files store them, a tied head once;
`gpt.checkpoints.checkpoint.model_from_state_dict` builds the model from them and ties the head.

Memory: loading never holds two copies of the weights. The model is built on the meta device and its
parameters are then *assigned* tensors that are views of the memory-mapped file (copy-on-write, so
training writes to private pages and never to the file). A Conv1D kernel becomes its transposed
view (`w.t()`), not a transposed copy: `F.linear` multiplies by a transposed weight about as fast as
by a contiguous one, and a copy would keep both the file's pages and the copy resident (peak memory
measured in BENCHMARKS.md). Weights are float32, what the model computes in; cast afterwards for
half precision, with `cast`: a copy made anyway is then row-major, the layout some kernels require
(`torch._weight_int8pack_mm` refuses any other).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from gpt.base.atomic import atomic_directory, resolve_directory
from gpt.base.errors import UserError, describe
from gpt.base.files import check_readable
from gpt.checkpoints.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_model_checkpoint,
    load_checkpoint,
    model_from_state_dict,
    read_safetensors,
    read_torch_file,
)
from gpt.checkpoints.key_map import Format, gpt_to_hf_state_dict, to_gpt_state_dict
from gpt.checkpoints.lora import is_lora_checkpoint, load_adapted
from gpt.checkpoints.tf_checkpoint import read_tf_checkpoint
from gpt.data.corpora import hub_unreachable
from gpt.model.config import ConfigError, GPTConfig, read_json_object
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID  # GPT-2's BOS and EOS

HUB_ORG = "openai-community"
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_HEAD_DIM = 64  # every published GPT-2 size; `n_heads` cannot be read off the tensor shapes
HF_BIN_FILE = "pytorch_model.bin"
OPENAI_FILES = ("hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001")

# ---- configs: each applies `overrides` through GPTConfig.from_dict, which refuses unknown names --


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """Our config for a HF `GPT2Config` (as a dict, e.g. a loaded `config.json`)."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"config.json is for a {hf_config['model_type']!r} model, not GPT-2 "
                        "(model_type 'gpt2'); only GPT-2 checkpoints can be loaded")
    try:
        fields = dict(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config["n_positions"],
            emb_dim=hf_config["n_embd"],
            n_heads=hf_config["n_head"],
            n_layers=hf_config["n_layer"],
            drop_rate=hf_config.get("resid_pdrop", 0.1),
            qkv_bias=True,
            tie_embeddings=hf_config.get("tie_word_embeddings", True),
            layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as exc:
        raise UserError(f"HF GPT-2 config lacks the field {exc.args[0]!r}; is it a GPT-2 config?") \
            from None
    return GPTConfig.from_dict({**fields, **overrides})


HF_NAMES = {"context_length": "n_positions", "emb_dim": "n_embd", "n_heads": "n_head",
            "n_layers": "n_layer",
            "drop_rate": "resid_pdrop", "tie_embeddings": "tie_word_embeddings",
            "layer_norm_eps": "layer_norm_epsilon"}
"""Our `GPTConfig` field -> the name of its value in a HF GPT-2 config.json (where they differ)."""
OPENAI_NAMES = {"vocab_size": "n_vocab", "context_length": "n_ctx", "emb_dim": "n_embd",
                "n_heads": "n_head",
                "n_layers": "n_layer"}
"""The same for OpenAI's hparams.json."""


def config_in_file(path: Path, names: Mapping[str, str], build: Callable[[],
                                                                         GPTConfig]) -> GPTConfig:
    """`build()`, the config of the file `path` (HF's or OpenAI's), whose `ConfigError` (a string or
    null where a number belongs, say) is re-raised naming the file, and each field by `names` (ours
    -> the file's)."""
    try:
        return build()
    except ConfigError as exc:
        message = str(exc)
        for ours, theirs in names.items():
            message = message.replace(f"GPTConfig.{ours}", theirs)
        raise ConfigError(f"{path} is not a valid model config: {message}") from None


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """The `config.json` of a HF `GPT2LMHeadModel` of our shape (the inverse of `config_from_hf`).
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation, as in our MLP
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Only a vocabulary that has <|endoftext|> can name it as BOS/EOS.
        **({"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID}
           if cfg.vocab_size > ENDOFTEXT_ID
           else {}),
    }


def _infer_hf_config(state: Mapping[str, Tensor], where: str, overrides: Mapping[str,
                                                                                 Any]) -> GPTConfig:
    """The config of a lone HF-named state dict, read off its tensor shapes.

    n_layers counts the `h.{i}` blocks, emb_dim and vocab_size come from `wte`, context_length from
    `wpe`. The head count is not visible in any shape: it is emb_dim // 64, GPT-2's head size in
    every published size, unless `n_heads=` is passed.
    """
    def tensor(name: str) -> Tensor:
        found = state.get(f"transformer.{name}", state.get(name))
        if found is None or found.dim() != 2:
            raise UserError(f"{where} has no 2-D {name!r} tensor; is it a GPT-2 checkpoint?")
        return found

    (vocab_size, emb_dim), context_length = (tensor("wte.weight").shape,
                                             tensor("wpe.weight").shape[0])
    blocks = {int(m[1]) for k in state if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    if "n_heads" not in overrides and emb_dim % GPT2_HEAD_DIM:
        raise UserError(f"cannot infer n_heads for {where}: its emb_dim {emb_dim} is not a "
                        f"multiple of GPT-2's head size {GPT2_HEAD_DIM}; pass n_heads=")
    if not blocks:
        raise UserError(f"{where} has no transformer blocks ('h.0.*' tensors); is it a GPT-2 "
                        f"checkpoint?")
    fields = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                  n_heads=emb_dim // GPT2_HEAD_DIM, n_layers=max(blocks) + 1, qkv_bias=True)
    return GPTConfig.from_dict({**fields, **overrides})


def _openai_config(path: Path, overrides: Mapping[str, Any]) -> GPTConfig:
    """Our config for OpenAI's `hparams.json`."""
    needs = "n_vocab, n_ctx, n_embd, n_head and n_layer, as in OpenAI's release"
    hparams = read_json_object(path, f"OpenAI's hparams ({needs})")
    try:
        fields = dict(vocab_size=hparams["n_vocab"], context_length=hparams["n_ctx"],
                      emb_dim=hparams["n_embd"], n_heads=hparams["n_head"],
                      n_layers=hparams["n_layer"],
                      qkv_bias=True, tie_embeddings=True)
    except KeyError as exc:
        raise UserError(f"{path} lacks the field {exc.args[0]!r}; it needs {needs}") from None
    return config_in_file(path, OPENAI_NAMES, lambda: GPTConfig.from_dict({**fields, **overrides}))


# ---- readers: each returns a name -> tensor dict of memory-mapped tensors ------------------------
# (safetensors: `gpt.checkpoints.checkpoint.read_safetensors`; TensorFlow:
# `gpt.checkpoints.tf_checkpoint.read_tf_checkpoint`)


def _read_bin(path: Path) -> dict[str, Tensor]:
    """A `pytorch_model.bin` state dict, unpickled only with `weights_only=True` (no code runs)."""
    # Only the zip format (torch >= 1.6) can be memory-mapped; older files are read whole.
    state = read_torch_file(path, "use a model.safetensors instead", mmap=zipfile.is_zipfile(path))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict (name -> tensor); is it a GPT-2 "
                        f"checkpoint?")
    return state


# ---- loading ----------------------------------------------------------------------------------


def _build(cfg: GPTConfig, state: Mapping[str, Tensor], fmt: Format, where: str) -> GPT:
    """A `GPT(cfg)` whose parameters are the tensors of `state` (in `fmt`), without copying them."""
    return model_from_state_dict(cfg, to_gpt_state_dict(state, cfg, fmt, where), where).eval()


def _openai_prefix(path: Path) -> Path:
    """The TensorFlow checkpoint of OpenAI's release in `path`: the prefix its `checkpoint` file
    names (`model_checkpoint_path: "model.ckpt"`), or model.ckpt without that file."""
    index = path / "checkpoint"
    check_readable(index)
    try:
        text = index.read_text(encoding="utf-8") if index.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {index} ({describe(exc)}): it should be the text line "
                        'model_checkpoint_path: "model.ckpt"; write that line into it, or delete '
                        "it") from None
    found = re.search(r'^model_checkpoint_path:\s*"(.*)"', text, re.M)
    return path / Path(found[1] if found else "model.ckpt").name


def _load_dir(path: Path, overrides: Mapping[str, Any]) -> GPT:
    if (path / "hparams.json").is_file():
        cfg = _openai_config(path / "hparams.json", overrides)
        prefix = _openai_prefix(path)
        return _build(cfg, read_tf_checkpoint(prefix), "openai", str(prefix))
    weights = next((path / f for f in (WEIGHTS_FILE, HF_BIN_FILE) if (path / f).is_file()), None)
    if (path / CONFIG_FILE).is_file() and weights is not None:
        config = read_json_object(path / CONFIG_FILE, "a model config")
        if "emb_dim" not in config:  # HF's field names (n_embd, ...), not our GPTConfig's
            cfg = config_in_file(path / CONFIG_FILE, HF_NAMES, lambda: config_from_hf(config,
                                                                                      **overrides))
            state = (read_safetensors(weights) if weights.suffix == ".safetensors"
                     else _read_bin(weights))
            return _build(cfg, state, "hf", str(weights))
    checkpoint = find_model_checkpoint(path)  # ours: `path` itself, or a run's best/ (else last/)
    if checkpoint is not None and is_lora_checkpoint(checkpoint):  # its base + adapters, merged
        return load_adapted(checkpoint, load_pretrained, **overrides).float().eval()
    if checkpoint is not None:
        return load_checkpoint(checkpoint, **overrides).float().eval()
    raise UserError(
        f"{path} has none of the known layouts; expected a Hugging Face GPT-2 directory "
        f"({CONFIG_FILE} + {WEIGHTS_FILE} or {HF_BIN_FILE}), OpenAI's release "
        f"({', '.join(OPENAI_FILES)}), or a checkpoint or run directory of this project "
        f"({CONFIG_FILE} + {WEIGHTS_FILE}, or best/)"
    )


def _download(name: str) -> Path:
    """The hub's `openai-community/<name>` files (config.json, model.safetensors) in its local
    cache."""
    repo = f"{HUB_ORG}/{name}"
    fix = (f"download {CONFIG_FILE} and {WEIGHTS_FILE} from https://huggingface.co/{repo} into a "
           f"directory and pass that instead of the name (e.g. --init models/{name})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(f"cannot download {repo}: huggingface_hub is not installed "
                        f"(pip install -e \".[hf]\"); or {fix}") from None
    unreachable = hub_unreachable()
    try:  # offline, only huggingface_hub's local cache can answer
        files = [Path(hf_hub_download(repo_id=repo, filename=f,
                                      local_files_only=unreachable is not None))
                 for f in (CONFIG_FILE, WEIGHTS_FILE)]
    # offline, hub down, proxy, ...: whatever the hub raises, the fix is the same
    except Exception as exc:
        if unreachable is not None:
            reason = (f"the hub cannot be reached ({unreachable}) and the files are not in the "
                      "local cache")
        else:
            reason = describe(exc)
        raise UserError(f"cannot download {repo} ({reason}); {fix}") from None
    return files[0].parent


def load_pretrained(name_or_path: str | Path, **overrides: Any) -> GPT:
    """GPT-2 with published (or exported) weights, in eval mode, on the CPU, in float32.

    `name_or_path` is a path (see the module docstring for the layouts) or one of `HUB_MODELS`
    (optionally prefixed `openai-community/`), downloaded from the Hugging Face hub; an existing
    path wins over a name. `overrides` replace `GPTConfig` fields, e.g. `drop_rate=0.0` for
    fine-tuning, or `n_heads=` for a lone `.safetensors` file (whose head count is taken to be
    emb_dim // 64). Any mismatch between the config and the tensors raises a `UserError` naming the
    tensor.
    """
    path = resolve_directory(Path(name_or_path))
    if path.is_dir():
        return _load_dir(path, overrides)
    if path.is_file():
        if path.suffix == ".safetensors":
            state = read_safetensors(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            state = _read_bin(path)
        else:
            raise UserError(f"cannot load {path}: expected a .safetensors or .bin file, or a "
                            f"directory")
        return _build(_infer_hf_config(state, str(path), overrides), state, "hf", str(path))
    name = str(name_or_path).removeprefix(f"{HUB_ORG}/")
    if name not in HUB_MODELS:
        raise UserError(f"{str(name_or_path)!r} is neither a file or directory nor a known model; "
                        f"known models: {', '.join(HUB_MODELS)} (also as {HUB_ORG}/<name>)")
    return _load_dir(_download(name), overrides)


def cast(model: GPT, dtype: torch.dtype) -> GPT:
    """`model.to(dtype)` in place, except that each tensor it copies is laid out row-major.

    `Module.to` keeps a tensor's strides, so an imported Conv1D weight (a transposed view, see the
    top) would become a transposed copy. A copy costs the same either way, and the int8 kernel
    refuses any layout but row-major. Tensors already in `dtype` are left as they are (views of the
    file). Returns the model.
    """
    def convert(tensor: Tensor) -> Tensor:
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        return tensor.to(dtype, memory_format=torch.contiguous_format)

    return model._apply(convert)


# ---- saving -----------------------------------------------------------------------------------


def save_hf(model: GPT, out_dir: str | Path) -> None:
    """Write `model` as a HF GPT-2 directory (`config.json` + `model.safetensors`), atomically.

    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it and computes the same logits. A
    tied head is stored once, as the token embedding, as HF does (`gpt_to_hf_state_dict`). `out_dir`
    is replaced as a whole, so it must be new, empty, or an earlier export.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir()
                             or {p.name for p in out_dir.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE}):
        raise UserError(f"{out_dir} exists and holds other files; save_hf replaces the whole "
                        f"directory, "
                        "so choose a new or empty one")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    hf_state = gpt_to_hf_state_dict(state, model.config)
    with atomic_directory(out_dir) as tmp:
        # HF requires the format tag
        save_file(hf_state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
