"""Atomic writes: an interrupted write leaves the previous version whole and no stray files."""

import json
from pathlib import Path

import pytest

from gpt.base.atomic import atomic_directory, atomic_file, resolve_directory, write_json


def test_atomic_file_replaces_the_target_only_when_the_block_completes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "tokens.bin"
    with atomic_file(target) as out:
        out.write(b"old")
        assert not target.exists()  # nothing under the real name while writing
    assert target.read_bytes() == b"old"
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as out:
        out.write(b"half of the new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["tokens.bin"]  # no temporary left


def test_write_json_writes_indented_json_through_atomic_file(tmp_path: Path) -> None:
    write_json(tmp_path / "meta.json", {"tokens": 3, "source": "default"})
    text = (tmp_path / "meta.json").read_text()
    assert json.loads(text) == {"tokens": 3, "source": "default"} and text.endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_atomic_directory_replaces_a_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "last"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "c").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_resolve_directory_finds_the_old_copy_after_a_kill_between_the_renames(tmp_path: Path) -> None:  # noqa: E501
    target = tmp_path / "best"
    target.mkdir()
    assert resolve_directory(target) == target
    target.rename(tmp_path / ".best.old")  # step 2 done, step 3 not: no best/ at all
    assert resolve_directory(target) == tmp_path / ".best.old"
    assert resolve_directory(tmp_path / "never") == tmp_path / "never"
