"""`python -m gpt evaluate --task choice|last-word` and `gpt.eval.tasks`: scores against
Hugging Face transformers, a memorised file, the training entry point, and every bad input."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt.base.atomic import atomic_directory
from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.checkpoints.weights import save_hf
from gpt.eval import last_word
from gpt.eval.choice import ChoiceRecord, encode_choice, evaluate_choices, score_choices
from gpt.eval.evaluate import main
from gpt.eval.last_word import (
    Passage,
    WordJudge,
    decode_word,
    encode_passage,
    evaluate_passages,
    score_passages,
    split_passage,
)
from gpt.eval.scoring import wilson_interval
from gpt.eval.tasks import load_eval_task, load_eval_tasks, task_accuracy
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = get_tokenizer()

# ---- scores against transformers, on random weights ---------------------------------------------


def random_model(context_length: int) -> GPT:
    """GPT-2's vocabulary (the tasks tokenize text), weights pushed far from the init so that every
    ending gets a different score and a wrong position or token would show."""
    model = GPT(GPTConfig(context_length=context_length, emb_dim=32, n_heads=2, n_layers=2,
                          drop_rate=0.0))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def hf_ending_log_likelihood(hf: GPT2LMHeadModel, context: str, ending: str, L: int) -> float:
    """lm-evaluation-harness's recipe, one ending at a time: context tokens (end-of-text if none)
    then those of " " + ending, cut from the left to L + 1; the ending tokens' log-probabilities,
    summed."""
    context_ids = TOKENIZER.encode_ordinary(context) or [ENDOFTEXT_ID]
    ending_ids = TOKENIZER.encode_ordinary(" " + ending)
    ids = (context_ids + ending_ids)[-(L + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()
    log_probs = torch.log_softmax(logits[-len(ending_ids):], dim=-1)
    return float(log_probs.gather(1, torch.tensor(ending_ids)[:, None]).sum())


CHOICES = [
    ChoiceRecord("A man is sitting on a roof. he", ("is using wrap to wrap a pair of skis.",
                 "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."), 3),
    ChoiceRecord("The sky is", ("blue.", "made of cheese and old socks, mostly."), 0),
    ChoiceRecord("", ("An empty context is read as one end-of-text token.", "Yes.", "No."), 1),
    ChoiceRecord(" ".join(f"word{i}" for i in range(40)), ("a context too long for the model", "b"),
                 1),
]


def test_each_endings_log_likelihood_and_the_picks_match_transformers(tmp_path: Path) -> None:
    L = 24  # the long context must be cut from the left
    model = random_model(L)
    save_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    encoded = [encode_choice(record, TOKENIZER, L) for record in CHOICES]
    # 9 rows of different lengths in one padded batch, then the truncated record's 2
    scores = score_choices(model, encoded[:3]) + score_choices(model, encoded[3:])
    assert [s.truncated for s in scores] == [False, False, False, True]
    for record, score in zip(CHOICES, scores, strict=True):
        expected = [hf_ending_log_likelihood(hf, record.context, e, L) for e in record.endings]
        lengths = [len(TOKENIZER.encode_ordinary(" " + e)) for e in record.endings]
        assert score.sums == pytest.approx(expected, abs=1e-4)
        assert score.means == pytest.approx([s / n for s, n in zip(expected, lengths, strict=True)],
                                            abs=1e-4)
        assert score.pick == max(range(len(expected)), key=expected.__getitem__)
        means = [s / n for s, n in zip(expected, lengths, strict=True)]
        assert score.pick_norm == max(range(len(means)), key=means.__getitem__)


def test_the_last_words_log_likelihood_matches_transformers(tmp_path: Path) -> None:
    L = 16
    model = random_model(L)
    save_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    texts = ["She opened the door and let the cat in",
             "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",  # longer than 16 tokens
             "Short passage, unusual ending: Ünïcödé"]
    passages = [split_passage(text) for text in texts]
    scores = score_passages(model, [encode_passage(p, TOKENIZER, L) for p in passages], TOKENIZER)
    for passage, score in zip(passages, scores, strict=True):
        # the same recipe as a choice with a single ending: the context is what fits before it
        expected = hf_ending_log_likelihood(hf, passage.context, passage.word, L - 1)
        assert -score.nll == pytest.approx(expected, abs=1e-4)
        assert score.tokens == len(TOKENIZER.encode_ordinary(" " + passage.word))
    assert [s.truncated for s in scores] == [False, True, False]


def test_a_passage_is_split_at_its_last_whitespace_delimited_word() -> None:
    assert split_passage("He said: 'stay here.'  \n") == Passage("He said: 'stay", "here.'")
    assert split_passage("one\ttwo") == Passage("one", "two")


def test_the_wilson_interval_has_its_closed_forms() -> None:
    # 0 of n: [0, z^2 / (n + z^2)]; 5 of 10: 0.5 -+ z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 1.959964 ** 2 / (10 + 1.959964 ** 2)))
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)


# ---- a tiny model that memorised its answers ----------------------------------------------------

NAMES = ["Anna", "Boris", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Iris", "Jonas",
         "Karl", "Lena", "Mona", "Nils", "Olga", "Paul"]
THINGS = ("red box.", "blue jar.", "green bag.", "old tin.")
# The name is the context's last token, so the right ending's first token follows it directly: a
# pairing a 2-layer model learns in a hundred steps (one it must attend back for takes longer).
MEMORISED = [ChoiceRecord(f"The keys of {name}", THINGS, i % 4) for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A run directory whose model trained on the right ending of every `MEMORISED` record, each on
    a line of its own (so a newline follows every last word), in 30 shuffled copies."""
    out = tmp_path_factory.mktemp("memorised")
    lines = [f"{r.context} {r.endings[r.label]}" for r in MEMORISED]
    text, rng = [], random.Random(0)
    for _ in range(30):
        rng.shuffle(lines)
        text += lines
    (out / "corpus.txt").write_text("\n".join(text) + "\n")
    cfg = TrainConfig(preset="tiny", context_length=16, batch_size=16, epochs=1000, max_steps=100,
                      lr=1e-2, min_lr=1e-4, warmup_steps=5, eval_freq=1000, eval_iters=1,
                      patience=0, sample_tokens=0, dtype="float32", drop_rate=0.0, device="cpu",
                      seed=123, out=str(out), run_name="run", data=str(out / "corpus.txt"),
                      val_data=str(out / "corpus.txt"))
    train(cfg)
    return out / "run"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_memorised_endings_are_picked_every_time_by_a_margin(memorised: Path) -> None:
    model = load_checkpoint(memorised / "best")
    scores = score_choices(model, [encode_choice(r, TOKENIZER, 16) for r in MEMORISED])
    assert all(s.pick == s.label and s.pick_norm == s.label for s in scores)
    # not a near-tie that another CPU's rounding could flip: the right ending is ahead by a margin
    margins = [s.means[s.label] - max(m for i, m in enumerate(s.means) if i != s.label)
               for s in scores]
    assert min(margins) > 0.25


def test_shuffled_labels_score_their_chance_agreement_not_the_memorised_one(
        memorised: Path) -> None:
    model = load_checkpoint(memorised / "best")
    rng = random.Random(1)
    shuffled = [ChoiceRecord(r.context, r.endings, rng.randrange(len(THINGS))) for r in MEMORISED]
    agreeing = sum(s.label == r.label for s, r in zip(shuffled, MEMORISED, strict=True))
    tally = evaluate_choices(model, shuffled, TOKENIZER, batch_size=5)
    assert tally.n == 16
    # the model still picks what it memorised: right exactly where a random label agrees with it,
    # which for four endings is near 1 in 4 and here well below the 16 of 16 of the true labels
    assert tally.correct_norm == tally.correct == agreeing <= 8


def test_greedy_decoding_reproduces_a_memorised_last_word_and_not_a_changed_one(
        memorised: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_checkpoint(memorised / "best")
    right = [f"{r.context} {r.endings[r.label]}" for r in MEMORISED]
    # the last word changed: another thing ("red jar."), the word without its full stop (the model
    # writes "box.": more than the word), the word cut short ("bo"), or longer ("boxes", whose
    # token the model's " box" is not, though it spells its start: decoded on, token by token)
    wrong = [[text.rsplit(" ", 1)[0] + " " + THINGS[(MEMORISED[i].label + 1) % 4].split()[1],
              text.replace(".", ""), text[:-2], text.replace(".", "es")][i % 4]
             for i, text in enumerate(right)]
    passages = [split_passage(text) for text in right + wrong]
    assert passages[0] == Passage("The keys of Anna red", "box.")
    decoded = []
    monkeypatch.setattr(last_word, "decode_word",
                        lambda *args, **kwargs: decoded.append(1) or decode_word(*args, **kwargs))
    tally = evaluate_passages(model, passages, TOKENIZER, batch_size=7)
    assert (tally.correct, tally.n) == (16, 32) and decoded
    scores = score_passages(model, [encode_passage(p, TOKENIZER, 16) for p in passages], TOKENIZER)
    assert [s.correct for s in scores] == [True] * 16 + [False] * 16
    # the same verdicts from transformers' own greedy decoding of the exported weights
    save_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert [hf_greedy_gives_the_word(hf, p) for p in passages] == [s.correct for s in scores]


def test_a_word_spelled_by_other_tokens_than_its_own_still_counts() -> None:
    judge = WordJudge("reddish.", TOKENIZER)
    pieces = [" re", "dd", "ish", ".", "\n"]
    tokens = [TOKENIZER.encode_single_token(piece) for piece in pieces]
    assert TOKENIZER.encode_ordinary(" reddish.") != tokens[:4]
    assert [judge.feed(token) for token in tokens] == [None, None, None, None, True]
    assert WordJudge("red", TOKENIZER).feed(TOKENIZER.encode_single_token(" redd")) is False
    assert WordJudge("red", TOKENIZER).feed(TOKENIZER.encode_single_token(" red")) is None
    judge = WordJudge("red", TOKENIZER)
    red = TOKENIZER.encode_single_token(" red")
    assert [judge.feed(red), judge.feed(ENDOFTEXT_ID)] == [None, True]


def hf_greedy_gives_the_word(hf: GPT2LMHeadModel, passage: Passage) -> bool:
    """transformers' greedy continuation, as text, starts with " " + the word, then whitespace or
    end-of-text."""
    ids = torch.tensor([TOKENIZER.encode_ordinary(passage.context)])
    target = " " + passage.word
    out = hf.generate(ids, max_new_tokens=len(target.encode()) + 1, do_sample=False,
                      pad_token_id=ENDOFTEXT_ID)[0, ids.size(1):].tolist()
    ended = ENDOFTEXT_ID in out
    text = TOKENIZER.decode(out[:out.index(ENDOFTEXT_ID)] if ended else out)
    if ended and text == target:
        return True
    return text.startswith(target) and text[len(target):][:1].isspace()


def test_the_command_reports_the_memorised_accuracy_and_the_training_entry_point_agrees(
        memorised: Path, tmp_path: Path, run_command) -> None:
    data = write_jsonl(tmp_path / "keys.jsonl", [{"ctx": r.context, "endings": list(r.endings),
                                                  "label": r.label, "ind": i}
                                                 for i, r in enumerate(MEMORISED)])
    argv = ["--checkpoint", str(memorised), "--task", "choice", "--data", str(data),
            "--dtype", "float32"]
    status, out, err = run_command(main, [*argv, "--json", "--limit", "12", "--batch-size", "5"])
    assert status == 0, err
    result = json.loads(out)
    assert result["records"] == 12 and result["truncated"] == 0
    assert result["acc"] == result["acc_norm"] == 1.0
    assert result["acc_norm_interval"] == pytest.approx(list(wilson_interval(12, 12)))
    status, out, err = run_command(main, argv)
    assert status == 0, err
    assert "16 records of 4 endings (chance 0.25)" in out
    assert "acc_norm   1.0000  (16/16, 95% Wilson interval 0.8064-1.0000)" in out
    # what training would log at an evaluation, on one rank and split over two
    task = load_eval_task(f"choice:{data}", limit=12, context_length=16)
    assert task.column == "choice_acc_norm:keys"
    model = load_checkpoint(memorised / "best")
    assert task_accuracy(model, task) == result["acc_norm"]
    counts: list[list[float]] = []
    for rank in (0, 1):
        task_accuracy(model, task, rank=rank, world_size=2,
                      all_reduce=lambda c: counts.append(c) or c)
    assert [sum(c) for c in zip(*counts, strict=True)] == [12.0, 12.0]


def test_the_last_word_command_reads_plain_text_and_jsonl_alike(memorised: Path, tmp_path: Path,
                                                                run_command) -> None:
    passages = [f"{r.context} {r.endings[r.label]}" for r in MEMORISED]
    blank_line_between = "\n".join(passages[:8]) + "\n\n" + "\n".join(passages[8:])
    (tmp_path / "passages.txt").write_text(blank_line_between)
    write_jsonl(tmp_path / "passages.jsonl", [{"text": p} for p in passages])
    results = []
    for name in ("passages.txt", "passages.jsonl"):
        argv = ["--checkpoint", str(memorised), "--task", "last-word",
                "--data", str(tmp_path / name), "--dtype", "float32", "--json"]
        status, out, err = run_command(main, argv)
        assert status == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert (results[0]["passages"], results[0]["acc"]) == (16, 1.0)
    assert results[0]["word_tokens"] == 16 * 2  # " box" ".", " jar" ".", ...
    spec = f"last-word:{tmp_path / 'passages.txt'}"
    task = load_eval_tasks([spec], limit=16, context_length=16)[0]
    assert task.column == "last_word_acc:passages"
    assert task_accuracy(load_checkpoint(memorised / "best"), task) == 1.0


# ---- bad input: one line, exit status 2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    with atomic_directory(out / "run" / "best") as tmp:
        save_model(random_model(32), tmp)
    return out / "run"


GOOD = {"context": "The sky is", "choices": ["blue.", "green."], "answer": 0}
BAD_INPUTS = [
    ("choice", [{"ctx": "A man is on a roof. he", "label": 0}], [],
     'a record needs a list of at least two endings under "endings", found none'),
    ("choice", [GOOD, {**GOOD, "answer": 2}], [],
     '"answer" is 2, out of range for 2 endings (0 to 1)'),
    ("choice", [{"ctx": "x", "endings": ["a", "b"], "label": ""}], [],
     "HellaSwag's test split has no labels"),
    ("choice", [], [], "holds no records"),
    ("choice", [{**GOOD, "choices": ["blue.", " "]}], [],
     "ending 1 is ' ', which tokenizes to nothing"),
    ("choice", [{**GOOD, "choices": ["blue.", "x " * 40]}], [],
     "ending 1 is 41 tokens, and the model reads 32"),
    ("choice", [GOOD], ["--limit", "0"], "--limit must be at least 1, got 0"),
    ("choice", [GOOD], ["--stride", "4"], "--stride applies to --task perplexity only"),
    ("last-word", [{"text": "Alone"}], [], "has 1 word; a last word needs a context"),
    ("last-word", [{"passage": "no text key"}], [],
     'a passage record is a JSON object with a "text"'),
    ("last-word", [], [], "holds no passages"),
    ("perplexity", [GOOD], ["--limit", "3"], "--limit applies to --task choice and last-word"),
]


@pytest.mark.parametrize(("task", "records", "flags", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(small_run: Path, tmp_path: Path, task: str,
                                                 records: list[dict], flags: list[str],
                                                 message: str) -> None:
    data = write_jsonl(tmp_path / "task.jsonl", records)
    command = [sys.executable, "-m", "gpt.eval.evaluate", "--checkpoint", str(small_run),
               "--task", task, "--data", str(data), *flags]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, done.stderr
    assert done.stderr.count("error:") == 1
