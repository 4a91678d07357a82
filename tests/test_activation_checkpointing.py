"""--activation-checkpointing: each block's activations recomputed in backward, the loss and every
gradient equal to the plain step's (float32, dropout on), with and without LoRA, in a fraction of
the saved activations; a resumed run may switch it on or off."""

import dataclasses

import pytest
import torch
from test_resume import interrupt_after
from tiny_runs import TOKENS, assert_same_params, params, tiny

from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.checkpoints.weights import load_pretrained
from gpt.model.config import GPTConfig
from gpt.model.lora import LoRASettings, add_lora
from gpt.model.model import GPT
from gpt.training import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_batch(lora: bool) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """A tiny model with dropout everywhere (and LoRA's, adapters of random B), in training mode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", drop_rate=0.1, qkv_bias=True))
    if lora:
        add_lora(model, LoRASettings(4, 8.0, 0.1, ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.05)
    x, y = torch.randint(0, 50257, (2, 24)), torch.randint(0, 50257, (2, 24))
    return model.train(), x, y


def loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor, seed: int):
    """The loss and every parameter's gradient of one step, dropout drawn from `seed`, and the
    random generator's state after it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model.loss(x, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, torch.get_rng_state()


@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_every_gradient_equal_the_plain_step_with_dropout(lora) -> None:
    model, x, y = model_and_batch(lora)
    plain = loss_and_grads(model, x, y, seed=5)
    model.activation_checkpointing = True
    checkpointed = loss_and_grads(model, x, y, seed=5)
    assert torch.equal(checkpointed[0], plain[0])
    assert checkpointed[1].keys() == plain[1].keys() and len(plain[1]) > 10
    for name, grad in plain[1].items():
        assert torch.equal(checkpointed[1][name], grad), name
    assert torch.equal(checkpointed[2], plain[2])  # the next step draws the same numbers too
    # Dropout did act: another seed draws other masks, another loss.
    assert not torch.equal(loss_and_grads(model, x, y, seed=6)[0], plain[0])


def saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor) -> int:
    """The bytes of the tensors the forward pass keeps for backward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(x, y)
    return total


def test_the_forward_pass_keeps_each_blocks_input_instead_of_its_activations() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", drop_rate=0.1, n_layers=6, vocab_size=64)  # blocks, not the head
    model = GPT(cfg).train()
    x, y = torch.randint(0, 64, (4, 128)), torch.randint(0, 64, (4, 128))
    plain = saved_bytes(model, x, y)
    model.activation_checkpointing = True
    checkpointed = saved_bytes(model, x, y)
    block_inputs = cfg.n_layers * x.numel() * cfg.emb_dim * 4  # (B, T, C) float32 per block
    assert checkpointed < plain / 4
    assert block_inputs <= checkpointed < block_inputs + plain / 8  # + the final norm and the head


def test_without_gradients_nothing_is_recomputed_and_the_logits_are_the_same() -> None:
    model, x, _ = model_and_batch(lora=False)
    model.eval()
    logits = model(x)
    model.activation_checkpointing = True
    with torch.no_grad():
        assert torch.equal(model(x), logits)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base") / "base"
    directory.mkdir()
    torch.manual_seed(3)
    save_model(GPT(GPTConfig.preset("tiny")), directory)
    return directory


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_with_activation_checkpointing_takes_the_plain_runs_steps(tmp_path, base_dir,
                                                                        lora) -> None:
    settings = dict(max_steps=6, drop_rate=0.1, init=str(base_dir))
    if lora:
        settings.update(lora_rank=4, lora_dropout=0.1)
    plain = trainer.train(tiny(tmp_path, run_name="plain", **settings), token_ids=TOKENS)
    checkpointed = trainer.train(tiny(tmp_path, run_name="ac", activation_checkpointing=True,
                                      **settings), token_ids=TOKENS)
    assert checkpointed.step_losses == plain.step_losses and len(plain.step_losses) == 6
    if not lora:
        assert_same_params(params(load_checkpoint(tmp_path / "ac" / "last")),
                           params(load_checkpoint(tmp_path / "plain" / "last")))


def test_a_resumed_run_may_switch_activation_checkpointing_on(tmp_path, base_dir,
                                                             monkeypatch) -> None:
    cfg = tiny(tmp_path, max_steps=8, drop_rate=0.1, init=str(base_dir), lora_rank=4)
    straight = trainer.train(dataclasses.replace(cfg, run_name="straight"), token_ids=TOKENS)
    interrupt_after(5, monkeypatch)
    trainer.train(cfg, token_ids=TOKENS)
    monkeypatch.undo()
    resumed = trainer.train(dataclasses.replace(cfg, activation_checkpointing=True),
                            resume=tmp_path / "run", token_ids=TOKENS)
    assert resumed.step_losses == {s: v for s, v in straight.step_losses.items() if s > 5}
    assert_same_params(params(load_pretrained(tmp_path / "run" / "last")),
                       params(load_pretrained(tmp_path / "straight" / "last")))
