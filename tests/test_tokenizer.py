import pytest

from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer

TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]


def test_book_example_encodes_offline(no_network: None, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # no help from an earlier cache
    get_tokenizer.cache_clear()
    tok = get_tokenizer()
    assert tok.n_vocab == 50257
    assert tok.eot_token == ENDOFTEXT_ID == 50256
    ids = tok.encode(TEXT, allowed_special={"<|endoftext|>"})
    assert ids == IDS
    assert tok.decode(ids) == TEXT


def test_special_token_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError):
        get_tokenizer().encode(TEXT)


def test_unknown_words_fall_back_to_subwords() -> None:
    tok = get_tokenizer()
    ids = tok.encode("Akwirw ier")
    assert ids == [33901, 86, 343, 86, 220, 959]
    assert tok.decode(ids) == "Akwirw ier"


def test_bpe_files_are_checked_against_their_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt.model.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(tokenizer.UserError, match=r"vocab\.bpe is corrupt"):
        tokenizer.bpe_files()
