"""The recipe files in recipes/ and the model-recipe settings they use (head, q/k/v bias, init,
betas)."""

from pathlib import Path

import pytest
import torch

from gpt.model.config import ConfigError, GPTConfig
from gpt.model.model import GPT
from gpt.training.flags import build_parser, read_toml
from gpt.training.optim import build_optimizer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe(name: str) -> TrainConfig:
    return TrainConfig.from_dict(read_toml(RECIPES / name))


# What each recipe says it builds: (tie_embeddings, qkv_bias, init_scheme), and its token
# embedding's std.
BUILDS = {
    "book-ch5.toml": (False, False, "torch", 1.0),
    "book-ch5-early-stop.toml": (False, False, "torch", 1.0),
    "tinyshakespeare.toml": (True, False, "gpt2", 0.02),
}


def test_every_recipe_file_is_listed_here() -> None:
    assert sorted(p.name for p in RECIPES.glob("*.toml")) == sorted(BUILDS)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_each_recipe_parses_and_builds_the_model_it_says(name: str) -> None:
    cfg = recipe(name)
    tied, bias, scheme, emb_std = BUILDS[name]
    torch.manual_seed(cfg.seed)
    # The recipe's model with fewer layers: the head, bias and init do not depend on the depth.
    model = build_model(TrainConfig.from_dict({**cfg.to_dict(), "n_layers": 1}))
    assert model.config.tie_embeddings is tied and model.config.init_scheme == scheme
    assert (model.lm_head.weight is model.tok_emb.weight) is tied
    assert (model.blocks[0].attn.qkv.bias is not None) is bias
    emb = model.tok_emb.weight[:model.config.vocab_size]
    assert emb.std().item() == pytest.approx(emb_std, rel=0.02)
    assert model.pos_emb.weight.std().item() == pytest.approx(emb_std, rel=0.05)


def test_the_book_recipe_is_the_books_run() -> None:
    cfg = recipe("book-ch5.toml")
    assert (cfg.data, cfg.preset, cfg.context_length, cfg.batch_size, cfg.epochs) == (
        "the-verdict", "gpt2-small", 256, 2, 10)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip) == (4e-4, 4e-4,
                                                                                       0, 0.1, 0)
    assert (cfg.eval_freq, cfg.eval_iters, cfg.patience, cfg.drop_rate, cfg.seed) == (5, 5, 0, 0.1,
                                                                                      123)
    assert cfg.betas == (0.9, 0.999) and cfg.dtype == "float32"
    early = recipe("book-ch5-early-stop.toml")
    assert early.patience > 0
    assert {**early.to_dict(), "patience": 0} == cfg.to_dict()  # the same run otherwise


def test_torch_init_is_pytorchs_module_defaults() -> None:
    """`init_scheme="torch"` leaves each module as its constructor made it: the same tensors as the
    modules built alone from the same random stream, in the model's order."""
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1,
                    qkv_bias=False,
                    tie_embeddings=False, init_scheme="torch")
    torch.manual_seed(5)
    model = GPT(cfg)
    torch.manual_seed(5)
    expected = [torch.nn.Embedding(50, 16).weight, torch.nn.Embedding(8, 16).weight,
                torch.nn.Linear(16, 48, bias=False).weight, *torch.nn.Linear(16, 16).parameters(),
                *torch.nn.Linear(16, 64).parameters(), *torch.nn.Linear(64, 16).parameters(),
                torch.nn.Linear(16, 50, bias=False).weight]
    ours = [model.tok_emb.weight, model.pos_emb.weight, model.blocks[0].attn.qkv.weight,
            *model.blocks[0].attn.proj.parameters(), *model.blocks[0].mlp.fc.parameters(),
            *model.blocks[0].mlp.proj.parameters(), model.lm_head.weight]
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(16))


def test_an_unknown_init_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="init_scheme must be one of gpt2, torch"):
        GPTConfig(init_scheme="xavier")


def test_model_recipe_flags_and_adam_betas() -> None:
    args = build_parser().parse_args(["--no-tie-embeddings", "--qkv-bias", "--init-scheme", "torch",
                                      "--adam-betas", "0.9,0.999"])
    cfg = TrainConfig(**vars(args))
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.init_scheme, cfg.betas) == (False, True, "torch",
                                                                              (0.9, 0.999))
    assert TrainConfig().betas == (0.9, 0.95)
    for bad in ("0.9", "0.9,1.0", "a,b", "0.9,0.99,0.999"):
        with pytest.raises(ConfigError, match="--adam-betas must be two numbers"):
            TrainConfig(adam_betas=bad)


def memorise(cfg: TrainConfig, init_scheme: str, steps: int) -> float:
    """Train a small-vocabulary, 2-layer version of `cfg`'s model recipe on 256 random tokens (all
    of them every 4 steps); the mean training loss of the last 4 steps."""
    torch.manual_seed(cfg.seed)
    text = torch.randint(0, 1000, (8 * 32 + 1,))
    x, y = text[:-1].view(8, 32), text[1:].view(8, 32)
    model = GPT(GPTConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=2, n_layers=2,
                          drop_rate=cfg.drop_rate or 0.0, qkv_bias=bool(cfg.qkv_bias),
                          tie_embeddings=bool(cfg.tie_embeddings), init_scheme=init_scheme))
    # A tiny model learns at a higher rate than GPT-2 small; the rest is the recipe's optimizer.
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=cfg.weight_decay, betas=cfg.betas)
    losses = []
    for step in range(steps):
        i = (step % 4) * 2
        loss = model.loss(x[i:i + 2], y[i:i + 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-4:]) / 4


def test_the_book_model_recipe_memorises_a_small_text_faster_than_gpt2_init() -> None:
    cfg = recipe("book-ch5.toml")
    book, gpt2 = memorise(cfg, "torch", 160), memorise(cfg, "gpt2", 160)
    # From ln(1000) = 6.9: the book's recipe is well into memorising; GPT-2's init, same steps, is
    # not.
    assert book < 1.5
    assert book < 0.8 * gpt2
