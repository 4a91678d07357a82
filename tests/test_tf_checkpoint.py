"""The TensorFlow checkpoint reader, on the committed fixture `fixtures/openai_tiny/` (written by
TensorFlow, see `fixtures/make_openai_fixture.py`) and on damaged copies of it.

That its tensors are OpenAI's names and shapes, and compute TensorFlow's logits, is tested in
test_weights.py.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.base.errors import UserError
from gpt.checkpoints.tf_checkpoint import _varint, read_tf_checkpoint

OPENAI_TINY = Path(__file__).parent / "fixtures" / "openai_tiny"
DATA_FILE = "model.ckpt.data-00000-of-00001"


@pytest.fixture
def openai_dir(tmp_path: Path) -> Path:
    shutil.copytree(OPENAI_TINY, tmp_path / "openai")
    return tmp_path / "openai"


def test_varint_decodes_the_protobuf_documentation_examples() -> None:
    """protobuf's encoding guide: 1 is 01, 150 is 96 01, 300 is ac 02 (7 bits a byte, low first)."""
    assert _varint(bytes([0x01]), 0) == (1, 1)
    assert _varint(bytes([0x96, 0x01]), 0) == (150, 2)
    assert _varint(bytes([0xFF, 0xAC, 0x02, 0x07]), 1) == (300, 3)  # from an offset, up to the next
    with pytest.raises(ValueError, match="truncated varint"):
        _varint(bytes([0xAC]), 0)


def test_tensors_tile_the_data_file_as_float32() -> None:
    """Every byte of the data file belongs to exactly one tensor: no tensor missed, none
    overlapping."""
    tensors = read_tf_checkpoint(OPENAI_TINY / "model.ckpt")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert sum(t.numel() * 4 for t in tensors.values()) == (OPENAI_TINY / DATA_FILE).stat().st_size
    data = np.fromfile(OPENAI_TINY / DATA_FILE, dtype="<f4")
    # address order = file order
    starts = sorted((t.numpy().ctypes.data, t) for t in tensors.values())
    assert torch.equal(torch.cat([t.flatten() for _, t in starts]), torch.from_numpy(data))


def test_tensors_are_writable_without_touching_the_file(openai_dir: Path) -> None:
    before = (openai_dir / DATA_FILE).read_bytes()
    tensors = read_tf_checkpoint(openai_dir / "model.ckpt")
    tensors["model/wte"].add_(1.0)  # copy-on-write pages: the change stays in this process
    assert (openai_dir / DATA_FILE).read_bytes() == before


def test_compressed_tf_block_is_refused(openai_dir: Path) -> None:
    """Set the index block's compression byte to snappy (1), as a writer with compression would."""
    index = bytearray((openai_dir / "model.ckpt.index").read_bytes())
    # The 48-byte footer starts with two block handles, (offset, size) varints each: the metaindex
    # block's, then the index block's; a block's trailer (compression byte, crc) follows its last
    # byte.
    footer = bytes(index[-48:])
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    offset, pos = _varint(footer, pos)
    size, _ = _varint(footer, pos)
    index[offset + size] = 1  # kSnappyCompression
    (openai_dir / "model.ckpt.index").write_bytes(bytes(index))
    with pytest.raises(UserError, match=r"index: it has a compressed block \(compression type 1\)"):
        read_tf_checkpoint(openai_dir / "model.ckpt")


@pytest.mark.parametrize(("file", "damage", "message"), [
    ("model.ckpt.index", "truncate", "bad magic number: the file is truncated or not a TF "
                                     "checkpoint index"),
    (DATA_FILE, "truncate", r"tensor 'model/\S+' runs past the end of its data file"),
    (DATA_FILE, "delete", f"its data file {DATA_FILE} is missing"),
])
def test_damaged_checkpoint_is_one_line_naming_the_index(openai_dir: Path, file: str, damage: str,
                                                         message: str) -> None:
    path = openai_dir / file
    if damage == "delete":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(UserError, match=message) as info:
        read_tf_checkpoint(openai_dir / "model.ckpt")
    assert str(info.value).startswith(f"cannot read TF checkpoint "
                                      f"{openai_dir / 'model.ckpt.index'}: ")
    assert "\n" not in str(info.value)
