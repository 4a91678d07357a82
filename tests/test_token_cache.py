"""The token cache: streamed tokenizing equals encoding the whole text; the cache is reused, rebuilt
when its source changes, and never left half-written."""

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from data_helpers import encode, one_line_error

from gpt.base.errors import UserError
from gpt.data import corpora, token_cache
from gpt.data.token_cache import load_tokens

# ---------------------------------------------------------------------------------------------
# Tokenization: chunking must not change a single token.

FRAGMENTS = ["a", "Z", "é", "日本", "1", "42", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "'s",
             "'ll",
             ".", "!!", "<|endoftext|>", "\u00a0", "\u2003", "\x1c", "\x85", "😀", " the", "ok", " "
                                                                                                "7"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(n))


def test_a_naive_cut_would_change_the_tokens() -> None:
    # The reference comparison has teeth: cutting after a space splits " world" into " " + "world".
    assert encode("hello ") + encode("world") != encode("hello world")


def test_safe_pieces_tokenize_exactly_like_the_whole_text() -> None:
    rng = random.Random(0)
    cuts = 0
    for _ in range(150):
        text = random_text(rng, rng.randint(1, 300))
        # Arbitrary incoming blocks (as decoded from file reads), re-cut at safe points.
        bounds = [*sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1))), len(text)]
        blocks = [text[a:b] for a, b in zip([0, *bounds], bounds, strict=False)]
        assert "".join(blocks) == text
        for target in (1, 3, 20):
            pieces = list(token_cache._safe_pieces(blocks, target))
            assert "".join(pieces) == text and all(pieces)
            assert [t for piece in pieces for t in encode(piece)] == encode(text), (text, pieces)
            cuts += len(pieces) - 1
    assert cuts > 1000  # the check was not vacuous


def test_streamed_file_tokens_equal_encoding_the_whole_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny reads and pieces: characters straddle read blocks, and there are hundreds of pieces.
    monkeypatch.setattr(corpora, "READ_BYTES", 7)
    monkeypatch.setattr(token_cache, "PIECE_CHARS", 40)
    text = random_text(random.Random(1), 3000)
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode())  # bytes, so "\r\n" stays as written
    assert load_tokens(str(path), data_dir=tmp_path / "data").tolist() == encode(text)


# ---------------------------------------------------------------------------------------------
# The cache.


@pytest.fixture
def tokenize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real tokenizations (the spy wraps the function that writes the token file)."""
    calls: list[int] = []
    real = token_cache._write_tokens

    def spy(*args: object, **kwargs: object) -> int:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(token_cache, "_write_tokens", spy)
    return calls


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path: Path,
                                                             tokenize_calls: list[int]) -> None:
    path = tmp_path / "story.txt"
    path.write_text("The cat sat on the mat.")
    cache = tmp_path / "data"
    first = load_tokens(str(path), data_dir=cache)
    again = load_tokens(str(path), data_dir=cache)
    assert len(tokenize_calls) == 1
    assert again.tolist() == first.tolist() == encode("The cat sat on the mat.")

    path.write_text("The dog sat on the mat.")  # same size: the content hash, not the size, notices
    assert load_tokens(str(path), data_dir=cache).tolist() == encode("The dog sat on the mat.")
    assert len(tokenize_calls) == 2

    (bin_file,) = (cache / "cache").glob("*.bin")
    meta = (cache / "cache" / f"{bin_file.stem}.json").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in meta
    assert sorted(p.name for p in (cache / "cache").iterdir()) == [bin_file.name,
                                                                   f"{bin_file.stem}.json"]


def test_cache_key_covers_the_tokenizer(tmp_path: Path, tokenize_calls: list[int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time")
    load_tokens(str(path), data_dir=tmp_path)
    monkeypatch.setattr(token_cache, "_tokenizer_id", lambda: "another-tokenizer")
    load_tokens(str(path), data_dir=tmp_path)
    assert len(tokenize_calls) == 2


@pytest.mark.parametrize("damage", ["big id", "truncated"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path, damage: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "story.txt"
    path.write_text("A story long enough to have a few tokens in it.")
    load_tokens(str(path), data_dir=tmp_path)
    (bin_file,) = (tmp_path / "cache").glob("*.bin")
    if damage == "big id":
        ids = np.fromfile(bin_file, dtype=np.uint16)
        ids[3] = 65535
        ids.tofile(bin_file)
    else:
        bin_file.write_bytes(bin_file.read_bytes()[:-3])
    assert load_tokens(str(path), data_dir=tmp_path).tolist() == encode(path.read_text())
    assert "corrupt" in capsys.readouterr().err


def test_interrupted_tokenization_leaves_the_old_cache_whole(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: E501
    path = tmp_path / "story.txt"
    path.write_text("The first version of the story.")
    cache = tmp_path / "data"
    load_tokens(str(path), data_dir=cache)
    before = {p.name: p.read_bytes() for p in (cache / "cache").iterdir()}

    def interrupted(pieces: Iterator[tuple[str, bool]], out: BinaryIO) -> int:
        out.write(b"\x01\x02" * 100)  # half a token file, then Ctrl-C
        raise KeyboardInterrupt

    path.write_text("The second version of the story.")
    monkeypatch.setattr(token_cache, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(str(path), data_dir=cache)
    assert {p.name: p.read_bytes() for p in (cache / "cache").iterdir()} == before  # no temp files
    monkeypatch.undo()
    assert load_tokens(str(path), data_dir=cache).tolist() == encode("The second version of the "
                                                                     "story.")


def test_unwritable_cache_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "story.txt").write_text("Some text.")
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be")
    with pytest.raises(UserError) as excinfo:
        load_tokens(str(tmp_path / "story.txt"), data_dir=not_a_dir)
    assert "token cache" in one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors that say what to do.


@pytest.mark.parametrize(("content", "offset"), [(b"hello \xff world", 6), (b"abc \xe2\x82", 4),
                                                 (b"caf\xc3\xa9 ok \xc3(", 9)])
def test_non_utf8_names_file_and_byte_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             content: bytes, offset: int) -> None:
    monkeypatch.setattr(corpora, "READ_BYTES", 4)  # the offset must survive block boundaries
    path = tmp_path / "latin1.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        load_tokens(str(path), data_dir=tmp_path / "data")
    message = one_line_error(excinfo)
    assert str(path) in message and f"at byte {offset} " in message and "--errors replace" in message  # noqa: E501

    replaced = load_tokens(str(path), data_dir=tmp_path / "data", errors="replace")
    assert replaced.tolist() == encode(content.decode("utf-8", "replace"))
    with pytest.raises(UserError, match=f"at byte {offset} "):  # strict again: no silent reuse
        load_tokens(str(path), data_dir=tmp_path / "data")


def test_unknown_errors_mode(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="strict, replace"):
        load_tokens("default", data_dir=tmp_path, errors="ignore")

