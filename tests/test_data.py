import hashlib
import http.server
import pickle
import random
import socket
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

import gpt.data as data
from gpt.data import (
    CORPORA,
    DOWNLOADS,
    DataError,
    Download,
    SlidingWindowDataset,
    create_dataloader,
    load_tokens,
    prepare_data,
    split_tokens,
)
from gpt.errors import UserError
from gpt.tokenizer import ENDOFTEXT_ID, get_tokenizer

EOT = ENDOFTEXT_ID


def encode(text: str) -> list[int]:
    """The reference: tiktoken on the whole text at once, special-token text treated as plain text."""
    return get_tokenizer().encode_ordinary(text)


def book_windows(ids: list[int], length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """The book's eager loop, as the reference."""
    return [(ids[s:s + length], ids[s + 1:s + length + 1]) for s in range(0, len(ids) - length, stride)]


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Windows, batches, memory.


@pytest.mark.parametrize("n", [1, 5, 6, 7, 50, 257])
@pytest.mark.parametrize("length", [1, 4, 5, 16])
@pytest.mark.parametrize("stride", [1, 3, 4, 5, 17])
def test_windows_match_the_book_formula(n: int, length: int, stride: int) -> None:
    ids = list(range(1000, 1000 + n))
    dataset = SlidingWindowDataset(np.array(ids, dtype=np.uint16), length, stride)
    expected = book_windows(ids, length, stride)
    assert len(dataset) == len(expected)
    for i, (x, y) in enumerate(expected):
        got_x, got_y = dataset[i]
        assert got_x.dtype == got_y.dtype == torch.int64
        assert got_x.tolist() == x and got_y.tolist() == y


@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("stride_of", [lambda L: 1, lambda L: L // 2, lambda L: L, lambda L: L + 37])
def test_gpt_sized_windows_match_the_book(length: int, stride_of) -> None:
    stride = stride_of(length)
    ids = np.random.default_rng(length).integers(0, 50257, size=3 * length + 11).astype(np.uint16)
    dataset = SlidingWindowDataset(ids, length, stride)
    starts = range(0, len(ids) - length, stride)
    assert len(dataset) == len(starts)
    for i, s in enumerate(starts):
        x, y = dataset[i]
        assert torch.equal(x, torch.from_numpy(ids[s:s + length].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(ids[s + 1:s + length + 1].astype(np.int64)))
    with pytest.raises(IndexError):
        dataset[len(starts)]


def test_bad_window_settings_are_user_errors() -> None:
    for kwargs in ({"context_length": 0, "stride": 1}, {"context_length": 4, "stride": 0}):
        with pytest.raises(UserError, match="must be >= 1"):
            SlidingWindowDataset(np.arange(10), **kwargs)
    with pytest.raises(ValueError, match="batch_size"):  # still a ValueError for plain Python callers
        create_dataloader(np.arange(10), batch_size=0, context_length=2, stride=2)


def test_dataset_over_a_memmap_keeps_it_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "ids.bin"
    ids = np.arange(100_000, dtype=np.uint16) % 50257
    ids.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(len(ids),))
    train, val = split_tokens(tokens, 0.25)
    for array, offset in ((tokens, 0), (train, 0), (val, 75_000)):
        for stride in (1, 64):
            dataset = SlidingWindowDataset(array, 64, stride)
            assert dataset.token_ids is array  # kept, not copied or widened to int64
            # What a spawn/forkserver DataLoader worker receives: the file's name and range only.
            blob = pickle.dumps(dataset)
            assert len(blob) < 2000
            clone = pickle.loads(blob)
            assert isinstance(clone.token_ids, np.memmap)
            last = len(dataset) - 1
            assert torch.equal(clone[last][0], dataset[last][0])
            start = offset + last * stride
            assert clone[last][1].tolist() == ids[start + 1:start + 65].tolist()


def test_dataloader_order_is_reproducible_and_resumable() -> None:
    ids = np.arange(500, dtype=np.uint16)
    loader = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    first = [x for x, _ in loader]
    again = [x for x, _ in create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # A shuffle, not the identity; each window once.
    starts = [int(x[0]) for batch in first for x in batch]
    assert starts != sorted(starts) and len(set(starts)) == len(starts)

    interrupted = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.sampler.state_dict()
    resumed = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    resumed.sampler.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(first[5:], rest, strict=True))


# ---------------------------------------------------------------------------------------------
# Splits.


def test_split_takes_validation_from_the_end_deterministically() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))
    again = split_tokens(tokens)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    train, val = split_tokens(np.arange(10), 0.25)  # 2.5 tokens rounds to 2 (half to even)
    assert (len(train), len(val)) == (8, 2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_must_be_inside_zero_one(fraction: float) -> None:
    with pytest.raises(UserError, match="between 0 and 1"):
        split_tokens(np.arange(100), fraction)


def test_prepare_data_split_and_separate_validation(tmp_path: Path) -> None:
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    train_file.write_text("It was a dark and stormy night; the rain fell in torrents. " * 20)
    val_file.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 5)
    cache = tmp_path / "data"
    whole = encode(train_file.read_text())
    train, val = prepare_data(str(train_file), context_length=8, data_dir=cache, val_fraction=0.2)
    n_val = round(len(whole) * 0.2)
    assert train.tolist() == whole[:-n_val] and val.tolist() == whole[-n_val:]

    train, val = prepare_data(str(train_file), str(val_file), context_length=8, data_dir=cache)
    assert train.tolist() == whole and val.tolist() == encode(val_file.read_text())


# ---------------------------------------------------------------------------------------------
# Tokenization: chunking must not change a single token.

FRAGMENTS = ["a", "Z", "é", "日本", "1", "42", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "'s", "'ll",
             ".", "!!", "<|endoftext|>", "\u00a0", "\u2003", "\x1c", "\x85", "😀", " the", "ok", " 7"]


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
            pieces = list(data._safe_pieces(blocks, target))
            assert "".join(pieces) == text and all(pieces)
            assert [t for piece in pieces for t in encode(piece)] == encode(text), (text, pieces)
            cuts += len(pieces) - 1
    assert cuts > 1000  # the check was not vacuous


def test_streamed_file_tokens_equal_encoding_the_whole_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny reads and pieces: characters straddle read blocks, and there are hundreds of pieces.
    monkeypatch.setattr(data, "READ_BYTES", 7)
    monkeypatch.setattr(data, "PIECE_CHARS", 40)
    text = random_text(random.Random(1), 3000)
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode())  # bytes, so "\r\n" stays as written
    assert load_tokens(str(path), data_dir=tmp_path / "data").tolist() == encode(text)


def test_default_corpus_is_python_help_and_loads_offline(tmp_path: Path, no_network: None) -> None:
    from pydoc_data.topics import topics

    expected: list[int] = []
    for key in sorted(topics):
        expected += ([EOT] if expected else []) + encode(topics[key])
    tokens = load_tokens("default", data_dir=tmp_path)
    assert len(tokens) > 100_000
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    assert tokens.tolist() == expected


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "b" / "a.txt").write_text("beta alpha")
    (root / "a.txt").write_text("first")
    (root / "empty.txt").write_text("")  # contributes nothing, not even a separator
    (root / "notes.md").write_text("not text for training")
    tokens = load_tokens(str(root), data_dir=tmp_path / "data").tolist()
    # Path components order: a.txt < b/a.txt < b.txt (plain string order would put b.txt first).
    assert tokens == [*encode("first"), EOT, *encode("beta alpha"), EOT, *encode("bee")]


def test_glob_source(tmp_path: Path) -> None:
    for name, text in [("x2.txt", "second"), ("x1.txt", "first"), ("y.txt", "other")]:
        (tmp_path / name).write_text(text)
    tokens = load_tokens(str(tmp_path / "x*.txt"), data_dir=tmp_path / "data").tolist()
    assert tokens == [*encode("first"), EOT, *encode("second")]


# ---------------------------------------------------------------------------------------------
# The cache.


@pytest.fixture
def tokenize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real tokenizations (the spy wraps the function that writes the token file)."""
    calls: list[int] = []
    real = data._write_tokens

    def spy(*args: object, **kwargs: object) -> int:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "_write_tokens", spy)
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
    assert sorted(p.name for p in (cache / "cache").iterdir()) == [bin_file.name, f"{bin_file.stem}.json"]


def test_cache_key_covers_the_tokenizer(tmp_path: Path, tokenize_calls: list[int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time")
    load_tokens(str(path), data_dir=tmp_path)
    monkeypatch.setattr(data, "_tokenizer_id", lambda: "another-tokenizer")
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
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "story.txt"
    path.write_text("The first version of the story.")
    cache = tmp_path / "data"
    load_tokens(str(path), data_dir=cache)
    before = {p.name: p.read_bytes() for p in (cache / "cache").iterdir()}

    def interrupted(pieces: Iterator[tuple[str, bool]], out: BinaryIO) -> int:
        out.write(b"\x01\x02" * 100)  # half a token file, then Ctrl-C
        raise KeyboardInterrupt

    path.write_text("The second version of the story.")
    monkeypatch.setattr(data, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(str(path), data_dir=cache)
    assert {p.name: p.read_bytes() for p in (cache / "cache").iterdir()} == before  # no temp files
    monkeypatch.undo()
    assert load_tokens(str(path), data_dir=cache).tolist() == encode("The second version of the story.")


def test_unwritable_cache_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "story.txt").write_text("Some text.")
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be")
    with pytest.raises(UserError) as excinfo:
        load_tokens(str(tmp_path / "story.txt"), data_dir=not_a_dir)
    assert "token cache" in one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Downloads, against a local HTTP server.


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


VERDICT = b"I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough."


def test_download_is_checked_cached_and_reused(tmp_path: Path, server: Server,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/the-verdict.txt"] = VERDICT
    url = f"{server.url}/the-verdict.txt"
    monkeypatch.setitem(DOWNLOADS, "the-verdict", Download(url, hashlib.sha256(VERDICT).hexdigest()))
    tokens = load_tokens("the-verdict", data_dir=tmp_path)
    assert tokens.tolist() == encode(VERDICT.decode())
    assert (tmp_path / "the-verdict.txt").read_bytes() == VERDICT
    assert load_tokens("the-verdict", data_dir=tmp_path).tolist() == tokens.tolist()
    assert server.requests == ["/the-verdict.txt"]  # downloaded once


def test_download_with_a_bad_checksum_leaves_nothing(tmp_path: Path, server: Server,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/input.txt"] = b"First Citizen: tampered"
    url = f"{server.url}/input.txt"
    monkeypatch.setitem(DOWNLOADS, "tinyshakespeare", Download(url, hashlib.sha256(b"other").hexdigest()))
    with pytest.raises(UserError) as excinfo:
        load_tokens("tinyshakespeare", data_dir=tmp_path / "data")
    message = one_line_error(excinfo)
    assert "sha256" in message and url in message
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("failure", ["404", "refused"])
def test_download_failure_names_the_url_and_where_to_put_the_file(tmp_path: Path, server: Server,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  failure: str) -> None:
    if failure == "404":
        url = f"{server.url}/missing.txt"
    else:
        with socket.socket() as sock:  # a port that was free a moment ago: connection refused
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/the-verdict.txt"
    monkeypatch.setitem(DOWNLOADS, "the-verdict", Download(url, hashlib.sha256(VERDICT).hexdigest()))
    with pytest.raises(UserError) as excinfo:
        load_tokens("the-verdict", data_dir=tmp_path)
    message = one_line_error(excinfo)
    assert url in message and str(tmp_path / "the-verdict.txt") in message
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_file_in_place_of_a_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "the-verdict.txt").write_text("not the story")
    with pytest.raises(UserError, match="delete it"):
        load_tokens("the-verdict", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Hugging Face streaming, with a stand-in for the `datasets` package.


def fake_datasets(records: list[dict[str, object]], calls: list[tuple[object, ...]]) -> types.ModuleType:
    module = types.ModuleType("datasets")

    def load_dataset(path: str, name: str | None = None, *, split: str, streaming: bool) -> Iterator[dict]:
        calls.append((path, name, split, streaming))
        return iter(records)

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hf_dataset_is_streamed_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    stories = ["Once upon a time there was a cat.", "", "The end. <|endoftext|> is just text here."]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"text": t} for t in stories], calls))
    tokens = load_tokens("hf:roneneldan/TinyStories:validation", data_dir=tmp_path).tolist()
    assert tokens == [*encode(stories[0]), EOT, *encode(stories[2])]
    assert calls == [("roneneldan/TinyStories", None, "validation", True)]
    load_tokens("hf:roneneldan/TinyStories:validation", data_dir=tmp_path)
    assert len(calls) == 1  # cached: the stream is not opened again

    load_tokens("hf:wikitext:wikitext-2-raw-v1:train", data_dir=tmp_path)
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "train", True)


def test_hf_without_datasets_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UserError) as excinfo:
        load_tokens("hf:roneneldan/TinyStories", data_dir=tmp_path)
    assert "pip install -e '.[hf]'" in one_line_error(excinfo)


def test_hf_record_without_text_names_the_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"story": "x", "id": 1}], []))
    with pytest.raises(UserError, match=r"no 'text' field.*story, id"):
        load_tokens("hf:someone/stories", data_dir=tmp_path)


def test_bad_hf_spec(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="hf:NAME:SPLIT"):
        load_tokens("hf:a:b:c:d", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors that say what to do.


@pytest.mark.parametrize("source", ["no/such/file.txt", "shakespeare"])
def test_unknown_source_lists_the_corpora(tmp_path: Path, source: str) -> None:
    with pytest.raises(UserError) as excinfo:
        load_tokens(source, data_dir=tmp_path)
    message = one_line_error(excinfo)
    assert source in message and all(name in message for name in CORPORA) and "hf:NAME" in message


def test_empty_sources(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_tokens(str(tmp_path / "empty.txt"), data_dir=tmp_path / "data")
    (tmp_path / "notext").mkdir()
    (tmp_path / "notext" / "readme.md").write_text("markdown only")
    with pytest.raises(UserError, match=r"holds no \.txt files"):
        load_tokens(str(tmp_path / "notext"), data_dir=tmp_path / "data")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(UserError, match=r"all 1 files .* are empty"):
        load_tokens(str(tmp_path / "blank"), data_dir=tmp_path / "data")
    with pytest.raises(UserError, match="no files match"):
        load_tokens(str(tmp_path / "*.nothing"), data_dir=tmp_path / "data")


@pytest.mark.parametrize(("content", "offset"), [(b"hello \xff world", 6), (b"abc \xe2\x82", 4),
                                                 (b"caf\xc3\xa9 ok \xc3(", 9)])
def test_non_utf8_names_file_and_byte_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             content: bytes, offset: int) -> None:
    monkeypatch.setattr(data, "READ_BYTES", 4)  # the offset must survive block boundaries
    path = tmp_path / "latin1.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        load_tokens(str(path), data_dir=tmp_path / "data")
    message = one_line_error(excinfo)
    assert str(path) in message and f"at byte {offset} " in message and "--errors replace" in message

    replaced = load_tokens(str(path), data_dir=tmp_path / "data", errors="replace")
    assert replaced.tolist() == encode(content.decode("utf-8", "replace"))
    with pytest.raises(UserError, match=f"at byte {offset} "):  # strict again: no silent reuse
        load_tokens(str(path), data_dir=tmp_path / "data")


def test_unknown_errors_mode(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="strict, replace"):
        load_tokens("default", data_dir=tmp_path, errors="ignore")


def test_too_few_tokens_for_one_window_names_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("hello world")  # 2 tokens
    with pytest.raises(UserError) as excinfo:
        prepare_data(str(path), context_length=4, data_dir=tmp_path)
    message = one_line_error(excinfo)
    assert "has 2 tokens" in message and "context_length + 1 = 5" in message


def test_validation_split_too_small_names_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    path.write_text(" one" * 100)  # 100 tokens
    assert len(encode(path.read_text())) == 100
    with pytest.raises(UserError) as excinfo:
        prepare_data(str(path), context_length=16, data_dir=tmp_path, val_fraction=0.1)
    message = one_line_error(excinfo)
    assert "validation split" in message and "has 10 tokens" in message and "+ 1 = 17" in message
    assert "between 0.17 and 0.83" in message
    for fraction in (0.17, 0.83):  # the advice works at both ends
        train, val = prepare_data(str(path), context_length=16, data_dir=tmp_path, val_fraction=fraction)
        assert min(len(train), len(val)) >= 17
    with pytest.raises(UserError, match=r"training split .* has 16 tokens"):
        prepare_data(str(path), context_length=16, data_dir=tmp_path, val_fraction=0.84)
    with pytest.raises(UserError, match="too few for one training and one validation window"):
        prepare_data(str(path), context_length=60, data_dir=tmp_path)
    val_file = tmp_path / "val.txt"
    val_file.write_text(" two" * 5)
    with pytest.raises(UserError, match=r"validation source .* has 5 tokens"):
        prepare_data(str(path), str(val_file), context_length=16, data_dir=tmp_path)


def test_data_errors_are_user_errors_and_value_errors() -> None:
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
