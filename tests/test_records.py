"""Records: reading every accepted shape, templates, targets position by position, padding, the
sampler."""

import json
from pathlib import Path

import pytest
import torch

from gpt import InstructionDataset, UserError, load_records, pad_collate
from gpt.data.buckets import BUCKET_BATCHES, BucketBatchSampler
from gpt.data.records import ALPACA_HEAD, Record, encode_record, format_prompt
from gpt.model.loss import IGNORE_INDEX
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer

TOK = get_tokenizer()
EOS = ENDOFTEXT_ID
M = IGNORE_INDEX


def ids(text: str) -> list[int]:
    return TOK.encode(text, disallowed_special=())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---- reading ------------------------------------------------------------------------------------


def test_load_records_reads_every_accepted_shape(tmp_path) -> None:
    jsonl = write_jsonl(tmp_path / "r.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Greet", "output": "Hi"},
        {"prompt": "P", "response": "R"},
        {"prompt": "P2", "completion": "C"},
        {"question": "Q?", "answer": "A"},
    ])
    # blank lines skipped
    (tmp_path / "blank.jsonl").write_text(jsonl.read_text().replace("\n", "\n\n"))
    expected = [Record("Add", "3", "1 2", "alpaca"), Record("Greet", "Hi", "", "alpaca"),
                Record("P", "R", "", "plain"), Record("P2", "C", "", "plain"), Record("Q?", "A", "",
                                                                                      "qa")]
    assert load_records(jsonl) == expected
    assert load_records(tmp_path / "blank.jsonl") == expected
    (tmp_path / "pairs.json").write_text(json.dumps([["Q1?", "A1"], {"question": "Q2?",
                                                                     "answer": "A2"}]))
    assert load_records(tmp_path / "pairs.json") == [Record("Q1?", "A1"), Record("Q2?", "A2")]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n{"question": "a",\n', "bad.jsonl:2: not valid "
                                                                           "JSON"),
    ("bad.json", '[\n["a", "b"],\n["c" "d"]\n]', "bad.json:3: not valid JSON"),
    ("keys.jsonl", '{"q": "a", "a": "b"}\n', "keys.jsonl:1: a record needs one of the key sets "
                                             "{instruction, output}, {prompt, response}"),
    ("empty.jsonl", "\n\n", "holds no records"),
    ("empty.json", "[]", "holds no records"),
    ("noanswer.jsonl", '{"question": "a", "answer": "  "}\n', "noanswer.jsonl:1: the response is "
                                                              "empty"),
    ("object.json", '{"question": "a", "answer": "b"}', "must hold a list of records"),
    ("number.jsonl", '{"question": "a", "answer": 3}\n', "must be strings"),
])
def test_bad_records_name_the_file_and_line(tmp_path, name, text, message) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as info:
        load_records(tmp_path / name)
    assert message in str(info.value)


def test_a_dataset_of_json_objects_is_the_dataset_of_their_records() -> None:
    """What the book passes in: the entries of its JSON file as json.load gives them."""
    entries = json.loads(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"},
                                     {"instruction": "Greet", "output": "Hi"},
                                     {"prompt": "P", "response": "R"},
                                     {"question": "Q?", "answer": "A"}, ["Q1?", "A1"]]))
    records = [Record("Add", "3", "1 2", "alpaca"), Record("Greet", "Hi", "", "alpaca"),
               Record("P", "R", "", "plain"), Record("Q?", "A", "", "qa"), Record("Q1?", "A1")]
    from_json, from_records = (InstructionDataset(x, TOK, "alpaca") for x in (entries, records))
    assert from_json.records == records and len(from_json) == len(from_records) == 5
    for i in range(5):
        assert all(torch.equal(a, b) for a, b in zip(from_json[i], from_records[i], strict=True))


@pytest.mark.parametrize(("entry", "message"), [
    ({"instruction": "Add", "input": "1 2"}, "record 2: a record needs one of the key sets"),
    ({"question": "Q?", "answer": " "}, "record 2: the response is empty"),
    ({"question": 3, "answer": "A"}, "record 2: question, answer and input must be strings"),
])
def test_a_bad_json_object_is_refused_with_the_file_loaders_message(tmp_path, entry,
                                                                     message) -> None:
    entries = [{"question": "ok", "answer": "fine"}, entry]
    (tmp_path / "r.json").write_text(json.dumps(entries))
    with pytest.raises(UserError) as from_file:
        load_records(tmp_path / "r.json")
    with pytest.raises(UserError) as from_python:
        InstructionDataset(entries, TOK)
    assert str(from_python.value).startswith(message)
    assert str(from_file.value) == f"{tmp_path / 'r.json'}: {from_python.value}"


# ---- templates ----------------------------------------------------------------------------------


def test_templates_lay_out_the_prompt() -> None:
    assert format_prompt("qa", "Why?") == "Question: Why?\nAnswer: "
    assert format_prompt("plain", "Why?") == "Why? "
    assert format_prompt("alpaca", "Add", "1 2") == ALPACA_HEAD + "Add\n\n### Input:\n1 2\n\n### Response:\n"  # noqa: E501
    assert format_prompt("alpaca", "Add") == ALPACA_HEAD + "Add\n\n### Response:\n"
    assert format_prompt("<{input}|{prompt}>", "p", "i") == "<i|p>"
    # no {input} field: after the prompt
    assert format_prompt("Q: {prompt} A:", "p", "i") == "Q: p\n\ni A:"
    with pytest.raises(UserError, match=r"has no \{prompt\} field"):
        InstructionDataset([Record("a", "b")], TOK, "Q: {question}")


# ---- tokens and targets, position by position ----------------------------------------------------


def test_targets_mask_the_prompt_and_keep_the_eos() -> None:
    prompt, response = ids("Question: Hi\nAnswer: "), ids("Yo there")
    full = [*prompt, *response, EOS]
    inputs, targets = encode_record(Record("Hi", "Yo there"), TOK, "qa", max_length=64)
    assert inputs == full[:-1]
    # Position i predicts full[i + 1]: the last prompt position predicts the first response token.
    assert targets == [M] * (len(prompt) - 1) + [*response, EOS]
    assert targets[-1] == EOS and len(inputs) == len(targets)


def test_without_masking_every_next_token_is_a_target() -> None:
    full = [*ids("Question: Hi\nAnswer: "), *ids("Yo"), EOS]
    inputs, targets = encode_record(Record("Hi", "Yo"), TOK, "qa", mask_prompt=False, max_length=64)
    assert (inputs, targets) == (full[:-1], full[1:])


def test_masks_come_from_positions_not_token_values() -> None:
    # The response spells the end-of-text token: it is text, and the real EOS still ends the
    # targets.
    inputs, targets = encode_record(Record("Hi", "a <|endoftext|> b"), TOK, "plain", max_length=64)
    assert targets.count(EOS) == 1 and targets[-1] == EOS
    assert EOS not in inputs


def test_a_long_prompt_is_cut_from_the_left_and_the_response_kept() -> None:
    prompt, response = ids("one two three four five six seven eight "), ids("nine")
    max_length = len(response) + 3  # room for 3 prompt tokens: inputs + 1 = max_length + 1 tokens
    inputs, targets = encode_record(Record("one two three four five six seven eight", "nine"), TOK,
                                    "plain",
                                    max_length=max_length)
    kept = prompt[-3:]
    assert inputs == [*kept, *response]
    assert targets == [M, M, *response, EOS]
    assert len(inputs) == max_length


def test_a_record_with_no_room_for_a_response_token_is_dropped() -> None:
    records = [Record("Hi", "short"), Record("Hi", "a much longer response than the context holds")]
    dataset = InstructionDataset(records, TOK, "plain", max_length=len(ids("short")) + 1)
    assert (len(dataset), dataset.dropped) == (1, 1)
    assert dataset.records == records[:1]
    # Exactly full: one prompt token, the response and its EOS are max_length + 1 tokens.
    inputs, targets = encode_record(records[0], TOK, "plain", max_length=len(ids("short")) + 1)
    assert (inputs, targets) == ([ids("Hi ")[-1], *ids("short")], [*ids("short"), EOS])
    assert encode_record(records[0], TOK, "plain", max_length=len(ids("short"))) is None


def test_pad_collate_pads_inputs_with_eos_and_targets_with_ignore() -> None:
    batch = [(torch.tensor([5, 6, 7]), torch.tensor([M, 7, 8])), (torch.tensor([9]),
                                                                  torch.tensor([EOS]))]
    inputs, targets = pad_collate(batch)
    assert inputs.tolist() == [[5, 6, 7], [9, EOS, EOS]]
    assert targets.tolist() == [[M, 7, 8], [EOS, M, M]]
    inputs, targets = pad_collate(batch, pad_id=0, ignore_index=-1)
    assert inputs.tolist() == [[5, 6, 7], [9, 0, 0]] and targets.tolist() == [[M, 7, 8], [EOS, -1,
                                                                                          -1]]


def test_instruction_dataset_items_are_shifted_equal_length_tensors() -> None:
    dataset = InstructionDataset([Record("Add", "3", "1 2", "alpaca")], TOK, "alpaca",
                                 max_length=256)
    x, y = dataset[0]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape
    # y is x shifted where counted
    assert torch.equal(x[1:], torch.where(y[:-1] == M, x[1:], y[:-1]))
    assert TOK.decode(x.tolist()) == format_prompt("alpaca", "Add", "1 2") + "3"


# ---- the bucketed sampler -----------------------------------------------------------------------


def test_bucketed_batches_cover_every_record_once_with_alike_lengths() -> None:
    lengths = [(i * 37) % 101 for i in range(300)]
    sampler = BucketBatchSampler(lengths, batch_size=4, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert len(batches) == 75 and sampler.epoch == 1
    # Each batch is a run of one length-sorted chunk: its spread is far below the data's.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                 for b in batches) / len(batches)
    assert spread < 100 / BUCKET_BATCHES
    assert list(sampler) != batches  # a new epoch, a new order
    # a function of (seed, epoch)
    assert BucketBatchSampler(lengths, 4, seed=1).batches(0) == batches


def test_bucketed_sampler_resumes_at_the_next_batch() -> None:
    lengths = list(range(50))
    sampler = BucketBatchSampler(lengths, batch_size=3, seed=7)
    whole = sampler.batches(0)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    resumed = BucketBatchSampler(lengths, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == len(whole) - 5
    assert first + list(resumed) == whole
