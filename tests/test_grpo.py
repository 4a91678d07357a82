"""GRPO's parts against references: the clipped loss and the group advantages against their
formulas, the policy gradient against REINFORCE by hand, the rollouts against the project's one-row
decoding, the rewards, and every bad input of --objective grpo. Whole runs:
tests/test_grpo_runs.py."""

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import cli_error, tiny

from gpt.base.errors import UserError
from gpt.cli.train import parse_args
from gpt.data.records import Record
from gpt.model.config import GPTConfig
from gpt.model.loss import IGNORE_INDEX
from gpt.model.model import GPT
from gpt.model.sampling import generate
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.objectives.grpo import GRPOStep, group_advantages, k3_kl, ppo_clip_loss
from gpt.objectives.rewards import PromptRecord, load_prompts, parse_reward, parse_rewards, score
from gpt.objectives.rollouts import (
    RolloutBatchSampler,
    RolloutState,
    completion_targets,
    decode_rows,
    draw,
)
from gpt.training.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = get_tokenizer()


def catalogue(log_probs, old_log_probs, advantages, clip) -> float:
    """The loss catalogue's formula, in NumPy: -mean(min(ratio * A, clip(ratio, 1 - c, 1 + c) * A)).
    """
    ratio = np.exp(log_probs - old_log_probs)
    return float(-np.mean(np.minimum(ratio * advantages, np.clip(ratio, 1 - clip, 1
                                                                 + clip) * advantages)))


# ---- the formulas --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spread", "clipped"), [(0.02, False), (1.0, True)])
def test_ppo_clip_loss_is_the_catalogues_formula_with_and_without_clipping(spread, clipped) -> None:
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    new = old + spread * torch.randn(5, 9, generator=generator, dtype=torch.float64)
    advantages = torch.randn(5, 1, generator=generator, dtype=torch.float64)
    ratio = (new - old).exp()
    assert bool(((ratio - 1).abs() > 0.2).any()) == clipped  # the case the parameter names
    loss = ppo_clip_loss(new, old, advantages, 0.2)
    assert float(loss) == pytest.approx(catalogue(new.numpy(), old.numpy(), advantages.numpy(),
                                                  0.2),
                                        rel=1e-12)
    if not clipped:  # then it is the plain surrogate -mean(ratio * A)
        assert float(loss) == pytest.approx(float(-(ratio * advantages).mean()), rel=1e-12)
    mask = torch.rand(5, 9, generator=generator) < 0.5
    kept = catalogue(new.numpy()[mask.numpy()], old.numpy()[mask.numpy()],
                     np.broadcast_to(advantages.numpy(), (5, 9))[mask.numpy()], 0.2)
    assert float(ppo_clip_loss(new, old, advantages, 0.2, mask)) == pytest.approx(kept, rel=1e-12)


def test_ppo_clip_loss_gradients_pass_gradcheck() -> None:
    generator = torch.Generator().manual_seed(1)
    old = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    new = (old + 0.4 * torch.randn(4, 6, generator=generator, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(4, 1, generator=generator, dtype=torch.float64)
    ratio = (new - old).exp().detach()
    # off the kinks
    assert ((ratio - 0.8).abs() > 1e-3).all() and ((ratio - 1.2).abs() > 1e-3).all()
    assert ((ratio < 0.8) | (ratio > 1.2)).any()  # and some terms clipped: their gradient is 0
    assert torch.autograd.gradcheck(lambda lp: ppo_clip_loss(lp, old, advantages, 0.2), (new,))


def test_group_advantages_are_each_reward_against_its_group() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 2.0]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4)
    expected = []
    for start in range(0, 12, 4):
        group = rewards[start:start + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        expected += [0.0 if std == 0 else (r - mean) / (std + 1e-4) for r in group]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # equal rewards: zeros, not NaN
    assert torch.equal(got[4:8], torch.zeros(4, dtype=torch.float64))
    unscaled = group_advantages(torch.tensor(rewards), 4, scale=False)
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.5, -0.5, -0.5,
                                               1.5])
    assert torch.equal(group_advantages(torch.full((8,), 0.3), 8), torch.zeros(8))


def test_k3_is_exp_d_minus_d_minus_1_never_negative_and_0_where_the_models_agree() -> None:
    log_probs, reference = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -3.0])
    pairs = zip(log_probs.tolist(), reference.tolist(), strict=True)
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in pairs]
    got = k3_kl(log_probs, reference)
    assert got.tolist() == pytest.approx(expected) and got[0] == 0 and (got > 0).sum() == 2


# ---- the policy gradient through a step ---------------------------------------------------------


def tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", drop_rate=0.0))


def batch_of(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompt_collate`'s batch of the first update of batch 0 of epoch 0."""
    ids = [TOKENIZER.encode(p) for p in prompts]
    padded = torch.full((len(ids), max(map(len, ids))), ENDOFTEXT_ID)
    for row, tokens in enumerate(ids):
        padded[row, :len(tokens)] = torch.tensor(tokens)
    return padded, torch.tensor([len(t) for t in ids]), torch.arange(len(ids)), torch.tensor([0, 0,
                                                                                              0])


def step_for(model: GPT, prompts: list[str], **settings) -> GRPOStep:
    cfg = tiny(Path("unused"), objective="grpo", reward=("regex:[kx]",), group_size=4,
               rollout_tokens=5,
               **settings)
    records = [PromptRecord(Record(p, ""), {"prompt": p}, f"record {i}") for i,
               p in enumerate(prompts)]
    return GRPOStep(cfg, model, None, parse_rewards(cfg.reward), records, RolloutState())


def test_with_one_update_the_gradient_is_reinforce_with_the_group_mean_as_baseline() -> None:
    model = tiny_model(3)
    prompts = ["The sea", "Once upon a time there"]
    step = step_for(model, prompts)
    sampled = []
    original = step.sample
    step.sample = lambda *args: sampled.append(original(*args)) or sampled[-1]  # type: ignore[method-assign]
    step(*batch_of(prompts)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # By hand: the rewards of the sampled texts, each against its group, times the sum of log p.
    rollout = sampled[0]
    counted = rollout.targets != IGNORE_INDEX
    texts = [TOKENIZER.decode([t for t in row[mask].tolist() if t != ENDOFTEXT_ID])
             for row, mask in zip(rollout.targets, counted, strict=True)]
    rewards = [float("k" in text or "x" in text) for text in texts]
    advantages = []
    for start in (0, 4):
        group = rewards[start:start + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        advantages += [0.0 if std == 0 else (r - mean) / (std + 1e-4) for r in group]
    assert any(advantages), rewards  # some group has something to teach
    log_p = torch.log_softmax(model(rollout.inputs).double(), dim=-1)
    token_log_p = log_p.gather(-1, rollout.targets.clamp(min=0)[..., None]).squeeze(-1) * counted
    weighted = torch.tensor(advantages, dtype=torch.float64) * token_log_p.sum(dim=1)
    reinforce = -weighted.sum() / counted.sum()
    reinforce.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(grads[name], param.grad.to(grads[name].dtype), rtol=1e-4,
                                   atol=1e-7,
                                   msg=name)


# ---- rollouts -----------------------------------------------------------------------------------


def test_rows_of_unequal_prompts_decode_as_each_alone_would_greedily_and_stop_at_end_of_text() -> None:  # noqa: E501
    model = tiny_model(5).eval()
    prompts = ["A", "The quick brown fox jumps", "Hello there"]
    padded, lengths, _, _ = batch_of(prompts)
    alone = [generate(model, padded[row:row + 1, :lengths[row]], 6)[0, lengths[row]:].tolist()
             for row in range(3)]
    # Row 1 stops at its first new token not seen before (k >= 1) when that token ends the text.
    k = next(k for k in range(1, 6) if alone[1][k] not in alone[1][:k])
    eos = alone[1][k]
    seq, new = decode_rows(model, padded, lengths, 6, eos_id=eos)
    for row, tokens in enumerate(alone):
        count = tokens.index(eos) + 1 if eos in tokens else 6
        assert int(new[row]) == count
        assert seq[row, :lengths[row]].tolist() == padded[row, :lengths[row]].tolist()
        assert seq[row, lengths[row]:lengths[row] + count].tolist() == tokens[:count], row
        assert (seq[row, lengths[row] + count:] == eos).all()  # then padding
    assert int(new[1]) == k + 1 < 6


def test_a_rows_samples_depend_on_its_own_random_numbers_not_on_the_batch() -> None:
    model = tiny_model(6)
    padded, lengths, _, _ = batch_of(["One two", "Three four five six"])
    uniforms = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    together, new = decode_rows(model, padded, lengths, 8, temperature=1.0, uniforms=uniforms)
    for row in range(2):
        alone, count = decode_rows(model, padded[row:row + 1, :lengths[row]], lengths[row:row + 1],
                                   8,
                                   temperature=1.0, uniforms=uniforms[row:row + 1])
        end = int(lengths[row] + count[0])
        assert int(new[row]) == int(count[0]) and together[row, :end].tolist() == alone[0,
                                                                                        :end].tolist()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, None, None), (0.7, 10, 0.8)])
def test_draw_picks_each_token_with_the_filtered_softmax_probability(temperature, top_k,
                                                                     top_p) -> None:
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(2)) * 2
    n = 20_000
    uniforms = (torch.arange(n) + 0.5) / n  # evenly spread: counts equal probabilities to 1/n
    tokens = draw(logits.repeat_interleave(n, dim=0), uniforms.repeat(2), temperature, top_k, top_p)
    for row in range(2):
        scaled = logits[row].double().numpy() / temperature
        keep = np.argsort(-scaled)[:top_k or 40]  # top-k, then the nucleus of the renormalised rest
        probs = np.exp(scaled[keep] - scaled[keep].max())
        probs /= probs.sum()
        if top_p is not None:
            before = np.cumsum(probs) - probs
            keep, probs = keep[before < top_p], probs[before < top_p] / probs[before < top_p].sum()
        expected = np.zeros(40)
        expected[keep] = probs
        counts = np.bincount(tokens[row * n:(row + 1) * n].numpy(), minlength=40) / n
        assert np.abs(counts - expected).max() < 2e-4, (counts, expected)


def test_only_completion_tokens_are_targets() -> None:
    seq = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 7, 0, 0, 0, 0]])
    inputs, targets = completion_targets(seq, torch.tensor([3, 1]), torch.tensor([3, 2]))
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 7, 0, 0, 0]]
    assert targets.tolist() == [[-100, -100, 4, 5, 0], [7, 0, -100, -100, -100]]


def test_with_two_updates_and_two_micro_batches_each_step_holds_two_batches_then_repeats_them() -> None:  # noqa: E501
    sampler = RolloutBatchSampler([3] * 10, 2, seed=0, updates=2, grad_accum=2,
                                  state=RolloutState())
    # 5 batches of 2: the fifth cannot fill a step of two, so 4 x 2 updates
    assert len(sampler) == 8
    places = [(batch, update) for batch, update in (sampler.locate(p) for p in range(8))]
    assert places == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    handed = [items[0][2:] for items in sampler]
    assert handed == places and sampler.epoch == 1


# ---- rewards -------------------------------------------------------------------------------------


def prompt(response: str = "", **fields) -> PromptRecord:
    question = "What is 2 + 3?"
    return PromptRecord(Record(question, response), {"prompt": question, **fields}, "q.jsonl:1")


@pytest.mark.parametrize(("spec", "completion", "reference", "expected"), [
    ("exact", "  It is\n 5 ", "It is 5", 1.0), ("exact", "It is 5.", "It is 5", 0.0),
    ("contains", "I think it is 5, yes", "it is 5", 1.0), ("contains", "it's 5", "it is 5", 0.0),
    ("number", "3 + 2 is 5", "5", 1.0), ("number", "5 or 6", "5", 0.0), ("number", "1,000.0",
                                                                         "1000", 1.0),
    ("number", "no number", "5", 0.0), ("regex:^[0-9]+$", "42", "", 1.0), ("regex:^[0-9]+$", "42!",
                                                                           "", 0.0),
])
def test_the_built_in_rewards(spec, completion, reference, expected) -> None:
    assert score([parse_reward(spec)], prompt(reference), completion) == expected


def test_rewards_are_summed_and_a_python_function_gets_prompt_completion_and_record(tmp_path) -> None:  # noqa: E501
    (tmp_path / "mine.py").write_text("def length(prompt, completion, record):\n"
                                      "    return len(completion) / 10 + record['bonus']\n")
    rewards = parse_rewards([f"{tmp_path / 'mine.py'}:length", "number"])
    assert score(rewards, prompt("5", bonus=2), "it is 5") == pytest.approx(0.7 + 2 + 1)


@pytest.mark.parametrize(("body", "message"), [
    ("    return 1 / 0\n", "--reward FILE:f raised ZeroDivisionError: division by zero on "
                           "q.jsonl:1"),
    ("    return 'high'\n", "--reward FILE:f returned 'high' on q.jsonl:1, not a finite number"),
    ("    return float('nan')\n", "returned nan on q.jsonl:1"),
])
def test_a_reward_that_raises_or_returns_no_number_names_the_record_and_the_reward(tmp_path, body,
                                                                                  message) -> None:
    (tmp_path / "r.py").write_text("def f(prompt, completion, record):\n" + body)
    spec = f"{tmp_path / 'r.py'}:f"
    with pytest.raises(UserError, match=re.escape(message.replace("FILE", str(tmp_path / "r.py")))):
        score([parse_reward(spec)], prompt(), "anything")


def test_prompt_records_need_a_prompt_and_keep_their_reference_answer(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2 + 3?", "answer": "5"}\n{"prompt": "Say hi"}\n'
                    '{"prompt": "p", "completion": "c"}\n')
    records = load_prompts(path)
    assert [(p.record.prompt, p.record.response, p.record.kind) for p in records] == [
        ("2 + 3?", "5", "qa"), ("Say hi", "", "plain"), ("p", "c", "plain")]
    assert records[1].where == f"{path}:2"


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"{i + 1}"}) + "\n"
                            for i in range(12)))
    return path


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(("flags", "message"), [
    (["--data", "RECORDS:{\"text\": \"x\"}"], "p2.jsonl:1: no prompt in this record (found "
                                              "{text})"),
    (["--data", "RECORDS:{\"prompt\": \"x\"}"], "no reference answer, which --reward number "
                                                 "compares completions with; add it as "
                                                 "\"response\" or "
                                                 "\"completion\""),
    (["--data", "RECORDS:{\"question\": \"x\", \"answer\": \"none\"}"], "has no number for "
                                                                        "--reward number"),
    (["--data", "default"], "--objective grpo samples answers to prompt records, not text "
                            "('default')"),
    (["--reward", "exactly"], "--reward 'exactly' is none of exact, contains, number, "
                              "regex:PATTERN or"),
    (["--reward", "regex:(unclosed"], "--reward regex:(unclosed: not a regular expression"),
    (["--reward", "missing.py:f"], "--reward missing.py:f: there is no file missing.py"),
    (["--reward", "FILE:nothing"], "has no function nothing (no such name)"),
    (["--no-reward"], "--objective grpo needs a --reward"),
    (["--group-size", "1"], "--group-size must be at least 2 (a group is the baseline), got 1"),
    (["--clip-ratio", "0"], "--clip-ratio must be in (0, 1), got 0.0"),
    (["--clip-ratio", "1"], "--clip-ratio must be in (0, 1), got 1.0"),
    (["--kl-beta", "-0.1"], "--kl-beta must be 0 or more, got -0.1"),
    (["--rollout-tokens", "128"], "--rollout-tokens 128 leaves no room for a prompt in the context "
                                  "of 128"),
    (["--rollout-temperature", "0"], "--rollout-temperature must be above 0"),
    (["--rollout-top-p", "1.5"], "--rollout-top-p must be in (0, 1]"),
    (["--updates-per-rollout", "0"], "--updates-per-rollout must be at least 1"),
    (["--loss-aggregation", "mean"], "--loss-aggregation must be token or sequence"),
    (["--scale-rewards", "std"], "--scale-rewards must be group or none"),
    (["--reference", "gpt2"], "--reference is the model of the KL term, which --kl-beta 0 leaves "
                              "out"),
    (["--kl-beta", "0.1", "--init", "scratch"], "--init scratch has none"),
    (["--loss-chunk", "8"], "--objective grpo: drop --loss-chunk"),
    (["--compile"], "--objective grpo: drop --compile"),
    (["--no-mask-prompt"], "--objective grpo: drop --no-mask-prompt"),
    (["--objective", "lm"], "--group-size is a setting of --objective grpo; add --objective grpo"),
])
def test_bad_grpo_input_is_one_line_and_writes_nothing(tmp_path, prompts_file, capsys, flags,
                                                       message) -> None:
    def resolve(value: str) -> str:
        if value.startswith("RECORDS:"):
            return write(tmp_path, "p2.jsonl", (value.removeprefix("RECORDS:") + "\n") * 10)
        return value.replace("FILE", write(tmp_path, "r.py", "x = 1\n"))

    base = ["--objective", "grpo", "--data", str(prompts_file), "--reward", "number", "--preset",
            "tiny",
            "--device", "cpu", "--out", str(tmp_path / "runs")]
    flags = [resolve(flag) for flag in flags]
    if "--no-reward" in flags:
        base, flags = base[:4] + base[6:], []
    if flags[:2] == ["--objective", "lm"]:
        base, flags = ["--data", str(prompts_file), "--group-size", "4"], base[6:]
    message = message.replace("p2.jsonl", str(tmp_path / "p2.jsonl"))
    assert message in cli_error([*base, *flags], capsys)
    assert not (tmp_path / "runs").exists()


def test_reward_is_a_repeatable_flag_a_toml_list_and_a_json_list_read_back_as_a_tuple(tmp_path) -> None:  # noqa: E501
    cfg, _ = parse_args(["--objective", "grpo", "--reward", "exact", "--reward", "regex:[0-9]"])
    assert cfg.reward == ("exact", "regex:[0-9]")
    (tmp_path / "grpo.toml").write_text('objective = "grpo"\nreward = ["number", "contains"]\n')
    from_toml, _ = parse_args(["--config", str(tmp_path / "grpo.toml")])
    assert from_toml.reward == ("number", "contains")
    flag_wins, _ = parse_args(["--config", str(tmp_path / "grpo.toml"), "--reward", "exact"])
    assert flag_wins.reward == ("exact",)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # train_config.json
    with pytest.raises(UserError, match=r"--reward must be a list of strings, got \(1,\)"):
        TrainConfig(reward=(1,))  # type: ignore[arg-type]
