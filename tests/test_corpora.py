"""Sources: files, directories, globs, the built-in corpus, downloads (against a local server) and
Hugging Face streams (against a stand-in for `datasets`), read through `load_tokens` and compared
with encoding the text directly."""

import hashlib
import http.server
import socket
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_helpers import EOT, encode, one_line_error

from gpt.base.errors import UserError
from gpt.data import corpora
from gpt.data.corpora import CORPORA, DOWNLOADS, Download
from gpt.data.token_cache import load_tokens

# ---------------------------------------------------------------------------------------------
# Local files and the built-in corpus.


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
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


VERDICT = b"I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough."


def test_download_is_checked_cached_and_reused(tmp_path: Path, server: Server,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/the-verdict.txt"] = VERDICT
    url = f"{server.url}/the-verdict.txt"
    monkeypatch.setitem(DOWNLOADS, "the-verdict", Download(url,
                                                           hashlib.sha256(VERDICT).hexdigest()))
    tokens = load_tokens("the-verdict", data_dir=tmp_path)
    assert tokens.tolist() == encode(VERDICT.decode())
    assert (tmp_path / "the-verdict.txt").read_bytes() == VERDICT
    assert load_tokens("the-verdict", data_dir=tmp_path).tolist() == tokens.tolist()
    assert server.requests == ["/the-verdict.txt"]  # downloaded once


def test_download_with_a_bad_checksum_leaves_nothing(tmp_path: Path, server: Server,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/input.txt"] = b"First Citizen: tampered"
    url = f"{server.url}/input.txt"
    monkeypatch.setitem(DOWNLOADS, "tinyshakespeare", Download(url,
                                                               hashlib.sha256(b"other").hexdigest()))
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
    monkeypatch.setitem(DOWNLOADS, "the-verdict", Download(url,
                                                           hashlib.sha256(VERDICT).hexdigest()))
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


def fake_datasets(records: list[dict[str, object]], calls: list[tuple[object,
                                                                      ...]]) -> types.ModuleType:
    module = types.ModuleType("datasets")

    def load_dataset(path: str, name: str | None = None, *, split: str,
                     streaming: bool) -> Iterator[dict]:
        calls.append((path, name, split, streaming))
        return iter(records)

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


@pytest.fixture
def hub_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reachability check passes without a connection (the stand-in streams need no hub)."""
    monkeypatch.setattr(corpora, "hub_unreachable", lambda: None)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch, no_network: None) -> list[tuple[str, int]]:
    """The addresses of every connection attempted (each refused: the network is off); no proxy and
    no HF_ENDPOINT, whatever this machine's environment says."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    attempts: list[tuple[str, int]] = []
    refuse = socket.create_connection

    def counting(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        attempts.append(address)
        return refuse(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", counting)
    return attempts


def test_hf_dataset_is_streamed_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 hub_reachable: None) -> None:
    calls: list[tuple[object, ...]] = []
    stories = ["Once upon a time there was a cat.", "", "The end. <|endoftext|> is just text here."]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"text": t} for t in stories],
                                                               calls))
    tokens = load_tokens("hf:roneneldan/TinyStories:validation", data_dir=tmp_path).tolist()
    assert tokens == [*encode(stories[0]), EOT, *encode(stories[2])]
    assert calls == [("roneneldan/TinyStories", None, "validation", True)]
    load_tokens("hf:roneneldan/TinyStories:validation", data_dir=tmp_path)
    assert len(calls) == 1  # cached: the stream is not opened again

    load_tokens("hf:wikitext:wikitext-2-raw-v1:train", data_dir=tmp_path)
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "train", True)


def test_hf_without_datasets_says_how_to_install_it(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UserError) as excinfo:
        load_tokens("hf:roneneldan/TinyStories", data_dir=tmp_path)
    assert 'pip install -e ".[hf]"' in one_line_error(excinfo)


def test_hf_record_without_text_names_the_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 hub_reachable: None) -> None:
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"story": "x", "id": 1}], []))
    with pytest.raises(UserError, match=r"no 'text' field.*story, id"):
        load_tokens("hf:someone/stories", data_dir=tmp_path)


def test_bad_hf_spec(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="hf:NAME:SPLIT"):
        load_tokens("hf:a:b:c:d", data_dir=tmp_path)


@pytest.mark.parametrize("package", ["stand-in", "datasets"])
def test_unreachable_hub_fails_at_once_without_retries(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                      connections: list[tuple[str, int]],
                                                      package: str) -> None:
    """One refused connection and a clean error; the stream (which would retry) is never opened."""
    calls: list[tuple[object, ...]] = []
    if package == "datasets":
        pytest.importorskip("datasets")  # the real package, whose own attempt would retry
    else:
        monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"text": "never read"}], calls))
    with pytest.raises(UserError) as excinfo:
        load_tokens("hf:roneneldan/TinyStories", data_dir=tmp_path)
    message = one_line_error(excinfo)
    assert "'hf:roneneldan/TinyStories'" in message and "hub cannot be reached" in message
    assert "huggingface.co:443: network disabled in this test" in message
    assert connections == [("huggingface.co", 443)] and calls == []


def test_dataset_directory_on_disk_needs_no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                connections: list[tuple[str, int]]) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"text": "Saved to disk."}], calls))
    local = tmp_path / "my_dataset"
    local.mkdir()
    assert load_tokens(f"hf:{local}", data_dir=tmp_path).tolist() == encode("Saved to disk.")
    assert calls == [(str(local), None, "train", True)] and connections == []


def test_hub_check_asks_the_configured_endpoint_and_trusts_a_proxy(
        monkeypatch: pytest.MonkeyPatch, connections: list[tuple[str, int]]) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-mirror.example.org:8080")
    assert corpora.hub_unreachable() == "hf-mirror.example.org:8080: network disabled in this test"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org")
    assert corpora.hub_unreachable() is not None
    assert connections == [("hf-mirror.example.org", 8080), ("hf-mirror.example.org", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    assert corpora.hub_unreachable() is None and len(connections) == 2  # the proxy connects, not us


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

