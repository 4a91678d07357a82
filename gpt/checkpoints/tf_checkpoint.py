"""TensorFlow checkpoints read without TensorFlow: `read_tf_checkpoint(prefix) -> {name: tensor}`.

A TF checkpoint ("tensor bundle") is `<prefix>.index`, a LevelDB-style sorted string table mapping
each tensor's name to a serialized `BundleEntryProto` (dtype, shape, shard, offset, size), and
`<prefix>.data-<shard>-of-<n>` files of raw little-endian tensor bytes. The table is: data blocks
of prefix-compressed (key, value) entries, an index block mapping to the data blocks, and a footer
holding the index block's handle (varint offset and size) and a magic number. The few protobuf
fields needed are decoded by hand, so reading needs neither TensorFlow nor protobuf. OpenAI's GPT-2
release is such a checkpoint (`gpt.checkpoints.weights` maps its names to ours).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt.base.errors import UserError

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic number
_BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)
_TF_DTYPES = {1: np.float32, 2: np.float64, 19: np.float16}  # TF's DataType enum: DT_FLOAT, ...


def read_tf_checkpoint(prefix: Path) -> dict[str, Tensor]:
    """The tensors of the TF checkpoint `prefix` (e.g. `dir/model.ckpt`), as views of its
    memory-mapped data files. Anything unreadable (a truncated or missing file, a feature TF's GPT-2
    release does not use) is a one-line `UserError` naming the index file."""
    index_path = prefix.with_name(prefix.name + ".index")
    try:
        entries = _read_table(index_path.read_bytes())
        # BundleHeaderProto: num_shards=1, endianness=2
        header = dict(_proto_fields(entries.pop(b"")))
        if header.get(2, 0) != 0:
            raise ValueError("it is big-endian; only little-endian checkpoints are supported")
        n_shards = int(header.get(1, 1))
        shards = []
        for shard in range(n_shards):
            data_path = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{n_shards:05d}")
            if not data_path.is_file():
                raise ValueError(f"its data file {data_path.name} is missing; download it")
            # Copy-on-write: the tensors are writable (training) without ever writing to the file.
            shards.append(np.memmap(data_path, dtype=np.uint8, mode="c") if data_path.stat().st_size
                          else np.zeros(0, np.uint8))  # mmap refuses empty files
        return {key.decode(): _tf_tensor(key.decode(), value, shards) for key,
                value in entries.items()}
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read TF checkpoint {index_path}: {exc}") from None


def _tf_tensor(name: str, entry: bytes, shards: list[np.ndarray]) -> Tensor:
    """The tensor a `BundleEntryProto` describes, as a view of its data file's memory map."""
    fields = dict(_proto_fields(entry))  # dtype=1, shape=2, shard_id=3, offset=4, size=5, slices=7
    if 7 in fields:
        raise ValueError(f"tensor {name!r} is partitioned into slices, which is not supported")
    dtype = _TF_DTYPES.get(int(fields.get(1, 0)))
    if dtype is None:
        raise ValueError(f"tensor {name!r} has TF dtype {fields.get(1)!r}; expected float32, 16 or "
                         f"64")
    shape_proto = fields.get(2, b"")
    if not isinstance(shape_proto, bytes):
        raise ValueError(f"tensor {name!r} has a malformed shape")
    shape = [int(dict(_proto_fields(dim)).get(1, 0)) for field, dim in _proto_fields(shape_proto)
             if field == 2 and isinstance(dim, bytes)]  # TensorShapeProto.dim=2, Dim.size=1
    shard, offset, size = (int(fields.get(f, 0)) for f in (3, 4, 5))
    if size != math.prod(shape) * np.dtype(dtype).itemsize or shard >= len(shards):
        raise ValueError(f"the entry of tensor {name!r} is inconsistent; download the checkpoint "
                         f"again")
    if offset + size > len(shards[shard]):
        raise ValueError(f"tensor {name!r} runs past the end of its data file, which is truncated; "
                         "download it again")
    return torch.from_numpy(shards[shard][offset:offset + size].view(dtype).reshape(shape))


def _read_table(table: bytes) -> dict[bytes, bytes]:
    """Every (key, value) of a LevelDB-style table file."""
    if len(table) < _FOOTER_SIZE or int.from_bytes(table[-8:], "little") != _TABLE_MAGIC:
        raise ValueError("bad magic number: the file is truncated or not a TF checkpoint index; "
                         "download it again")
    footer = table[-_FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # the metaindex block's offset and size: TF puts nothing there
    _, pos = _varint(footer, pos)
    return {key: value
            for _, data_handle in _table_block(table, footer[pos:])
            for key, value in _table_block(table, data_handle)}


def _table_block(table: bytes, handle: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of the table block that the encoded block handle points to."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + _BLOCK_TRAILER_SIZE > len(table):
        raise ValueError("a block runs past the end of the file; download it again")
    if table[offset + size] != 0:
        raise ValueError(f"it has a compressed block (compression type {table[offset + size]}), "
                         f"which this "
                         "reader does not decompress; TensorFlow writes checkpoints uncompressed, "
                         "so re-save it with TensorFlow's defaults")
    block = table[offset:offset + size]
    # The block ends with its restart points (uint32s, then their count), which a scan does not
    # need.
    n_restarts = int.from_bytes(block[-4:], "little")
    end, pos, key = len(block) - 4 * (n_restarts + 1), 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)  # bytes of the previous key this key starts with
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_size]
        pos += value_size


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire_type = tag & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):  # fixed64, fixed32 (the only one TF uses here is the crc32c)
            size = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield tag >> 3, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode the base-128 varint at `buf[pos]`; return it and the position after it."""
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")
