"""Preference records: the accepted forms, their bad inputs, and how a pair is encoded and batched.
"""

import json
from pathlib import Path

import pytest
import torch

from gpt.base.errors import UserError
from gpt.data.pairs import PreferenceDataset, PreferencePair, encode_pair, load_pairs, pair_collate
from gpt.data.records import Record, encode_record, format_prompt
from gpt.model.loss import IGNORE_INDEX
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer

TOKENIZER = get_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_three_prompt_forms_are_read_with_their_kinds(tmp_path) -> None:
    rows = [{"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Blue"},
            {"instruction": "Translate.", "input": "chat", "chosen": "cat", "rejected": "dog"},
            {"question": "Is it 2?", "chosen": "Yes, it is 2.", "rejected": "No"}]
    expected = [PreferencePair("Name a colour.", "Blue is a colour.", "Blue", kind="plain"),
                PreferencePair("Translate.", "cat", "dog", input="chat", kind="alpaca"),
                PreferencePair("Is it 2?", "Yes, it is 2.", "No", kind="qa")]
    assert load_pairs(write_jsonl(tmp_path / "p.jsonl", rows)) == expected
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_pairs(tmp_path / "p.json") == expected


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": "a"}, 'p.jsonl:2: a preference record needs a prompt and the chosen '
                                     'and rejected responses, e.g. {"prompt"'),
    ({"prompt": "p", "rejected": "a"}, "it has no chosen"),
    ({"prompt": "p"}, "it has no chosen and no rejected"),
    ({"chosen": "a", "rejected": "b"}, "it has no prompt (or instruction, or question)"),
    ({"prompt": "p", "chosen": "Same answer", "rejected": "Same answer "}, "p.jsonl:2: chosen and "
                                                                           "rejected "
                                                                          "are the same text"),
    ({"prompt": "p", "chosen": "a", "rejected": " "}, "p.jsonl:2: the rejected is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "prompt, chosen, rejected and input must be "
                                                    "strings"),
    (["p", "a"], "a preference record is a JSON object"),
])
def test_a_bad_preference_record_is_refused_naming_its_line(tmp_path, row, message) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"},
                                              row])
    with pytest.raises(UserError) as info:
        load_pairs(path)
    assert message in str(info.value)


def test_a_dataset_of_json_objects_is_the_dataset_of_their_pairs() -> None:
    """What the book passes in: the entries of its JSON file as json.load gives them."""
    entries = json.loads(json.dumps([
        {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Blue"},
        {"instruction": "Translate.", "input": "chat", "chosen": "cat", "rejected": "dog"},
        {"question": "Is it 2?", "chosen": "Yes, it is 2.", "rejected": "No"}]))
    pairs = [PreferencePair("Name a colour.", "Blue is a colour.", "Blue", kind="plain"),
             PreferencePair("Translate.", "cat", "dog", input="chat", kind="alpaca"),
             PreferencePair("Is it 2?", "Yes, it is 2.", "No", kind="qa")]
    from_json, from_pairs = (PreferenceDataset(x, TOKENIZER, "qa") for x in (entries, pairs))
    assert from_json.pairs == pairs and len(from_json) == len(from_pairs) == 3
    for i in range(3):  # the four token tensors (the fifth, the reference, is NaN until computed)
        assert all(torch.equal(a, b)
                   for a, b in zip(from_json[i][:4], from_pairs[i][:4], strict=True))


@pytest.mark.parametrize(("entry", "message"), [
    ({"prompt": "p", "chosen": "a"},
     "record 2: a preference record needs a prompt and the chosen and rejected responses"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"},
     "record 2: chosen and rejected are the same text"),
])
def test_a_bad_json_object_is_refused_with_the_file_loaders_message(tmp_path, entry,
                                                                     message) -> None:
    entries = [{"prompt": "ok", "chosen": "a", "rejected": "b"}, entry]
    (tmp_path / "p.json").write_text(json.dumps(entries))
    with pytest.raises(UserError) as from_file:
        load_pairs(tmp_path / "p.json")
    with pytest.raises(UserError) as from_python:
        PreferenceDataset(entries, TOKENIZER)
    assert str(from_python.value).startswith(message)
    assert str(from_file.value) == f"{tmp_path / 'p.json'}: {from_python.value}"


def test_each_response_is_encoded_as_fine_tuning_encodes_a_record_with_the_prompt_masked() -> None:
    pair = PreferencePair("Name a colour.", "Blue is a colour.", "Red")
    chosen, rejected = encode_pair(pair, TOKENIZER, "qa")
    assert chosen == encode_record(Record(pair.prompt, pair.chosen, kind="plain"), TOKENIZER, "qa")
    assert rejected == encode_record(Record(pair.prompt, pair.rejected), TOKENIZER, "qa")
    # Counted targets are exactly the response's tokens and its end-of-text, found from the text
    # here.
    prompt = TOKENIZER.encode(format_prompt("qa", pair.prompt))
    for (inputs, targets), response in ((chosen, pair.chosen), (rejected, pair.rejected)):
        assert inputs[:len(prompt)] == prompt
        assert targets == [IGNORE_INDEX] * (len(prompt) - 1) + TOKENIZER.encode(response) + [ENDOFTEXT_ID]  # noqa: E501


def test_a_long_prompt_is_cut_alike_for_both_responses_so_both_read_the_same_prompt() -> None:
    pair = PreferencePair("one two three four five six seven eight nine ten", "a b c d e f", "z")
    chosen, rejected = encode_pair(pair, TOKENIZER, "plain", max_length=12)
    # with end-of-text
    response = {"chosen": len(TOKENIZER.encode("a b c d e f")) + 1, "rejected": 2}
    prompts = [inputs[:len(inputs) - response[name] + 1]
               for name, (inputs, _) in (("chosen", chosen), ("rejected", rejected))]
    # the longer response fills the context
    assert prompts[0] == prompts[1] and len(chosen[0]) == 12
    assert TOKENIZER.decode(prompts[0]).endswith("ten ")
    assert encode_pair(pair, TOKENIZER, "plain", max_length=6) is None  # no room for "a b c d e f"


def test_a_batch_of_pairs_is_one_padded_batch_chosen_rows_first_with_their_reference() -> None:
    pairs = [PreferencePair("Say hi.", "Hi there, friend.", "Hi"),
             PreferencePair("Say no.", "No.", "Nope, never")]
    dataset = PreferenceDataset(pairs, TOKENIZER, "plain")
    dataset.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    inputs, targets, reference = pair_collate([dataset[0], dataset[1]])
    rows = [dataset.examples[0][0], dataset.examples[1][0], dataset.examples[0][1],
            dataset.examples[1][1]]
    longest = max(len(x) for x, _ in rows)
    assert inputs.shape == targets.shape == (4, longest)
    for row, (x, y) in enumerate(rows):
        assert inputs[row].tolist() == x + [ENDOFTEXT_ID] * (longest - len(x))
        assert targets[row].tolist() == y + [IGNORE_INDEX] * (longest - len(y))
    # chosen of pair 0, 1, then rejected of 0, 1
    assert reference.tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert dataset.lengths() == [max(len(dataset.examples[i][0][0]), len(dataset.examples[i][1][0]))
                                 for i in range(2)]
