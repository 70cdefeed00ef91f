"""Read TensorFlow checkpoints (tensor bundles) without TensorFlow.

A checkpoint ``PREFIX`` is two kinds of file:

* ``PREFIX.index``: an SSTable (LevelDB's table format, as TensorFlow writes it) mapping
  each tensor name to a ``BundleEntryProto`` (dtype, shape, shard, offset, size); the
  empty key holds a ``BundleHeaderProto`` (number of shards, endianness).
* ``PREFIX.data-SSSSS-of-NNNNN``: the tensors' raw little-endian bytes at those offsets.

This module parses both by hand: the table's footer, index and data blocks (with their
prefix-compressed keys and crc32c checks), and the few protobuf fields needed (varints
decoded directly). It reads OpenAI's GPT-2 release checkpoints and any other unpartitioned
TensorFlow 1.x/2.x ``Saver`` checkpoint of numeric tensors.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import CheckpointError

_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked crc32c
_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.int32,
    4: torch.uint8,
    5: torch.int16,
    6: torch.int8,
    9: torch.int64,
    10: torch.bool,
    14: torch.bfloat16,
    19: torch.float16,
}


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``crc``."""
    c = crc ^ 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The rotated-and-offset CRC that LevelDB tables store."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a protobuf/LevelDB varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the end of the buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint is too long")


def proto_fields(buf: bytes) -> dict[int, list]:
    """All fields of a serialized protobuf message: number -> values (ints or bytes)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = read_varint(buf, pos)
        elif wire == 1:
            val = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            val = bytes(buf[pos:pos + n])
            if len(val) != n:
                raise ValueError("length-delimited field runs past the end")
            pos += n
        elif wire == 5:
            val = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(num, []).append(val)
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class TensorEntry:
    """Where one tensor lives in the data file(s)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


def _read_block(data: bytes, offset: int, size: int, path: str) -> bytes:
    end = offset + size
    if end + _TRAILER_LEN > len(data):
        raise CheckpointError(f"{path} is truncated (a block runs past its end)", "copy the checkpoint again")
    block = data[offset:end]
    kind = data[end]
    stored = struct.unpack_from("<I", data, end + 1)[0]
    if masked_crc32c(data[offset:end + 1]) != stored:
        raise CheckpointError(f"{path} is corrupt (a block fails its crc32c check)", "copy the checkpoint again")
    if kind != 0:
        raise CheckpointError(
            f"{path} has compressed blocks (type {kind}), which this reader does not handle",
            "convert the checkpoint with TensorFlow, or use the Hugging Face files of the model",
        )
    return block


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Key/value pairs of a table block (keys are prefix-compressed against the previous one)."""
    if len(block) < 4:
        raise ValueError("block too short")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (n_restarts + 1)
    if limit < 0:
        raise ValueError("bad restart count")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        vlen, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise ValueError("bad block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    off, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return off, size, pos


def read_index(index_path: str) -> tuple[dict[int, list], dict[str, TensorEntry]]:
    """Parse a ``.index`` file: (header fields, name -> TensorEntry)."""
    try:
        with open(index_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {index_path} ({e.strerror})", "check the checkpoint folder") from None
    if len(data) < _FOOTER_LEN or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
        raise CheckpointError(f"{index_path} is not a TensorFlow checkpoint index (no table magic at its end)",
                              "give the folder holding OpenAI's model.ckpt.index and model.ckpt.data-* files")
    try:
        footer = data[len(data) - _FOOTER_LEN:]
        _, _, pos = _handle(footer)  # metaindex handle (unused)
        idx_off, idx_size, _ = _handle(footer, pos)
        header: dict[int, list] | None = None
        entries: dict[str, TensorEntry] = {}
        for _, handle in _block_entries(_read_block(data, idx_off, idx_size, index_path)):
            off, size, _ = _handle(handle)
            for key, value in _block_entries(_read_block(data, off, size, index_path)):
                if key == b"":
                    header = proto_fields(value)
                    continue
                entries[key.decode("utf-8")] = _entry(key.decode("utf-8"), proto_fields(value), index_path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path} is corrupt ({e})", "copy the checkpoint again") from None
    if header is None:
        raise CheckpointError(f"{index_path} has no bundle header", "copy the checkpoint again")
    if header.get(2, [0])[0] != 0:
        raise CheckpointError(f"{index_path} stores big-endian tensors", "convert the checkpoint on a little-endian machine")
    return header, entries


def _entry(name: str, f: dict[int, list], path: str) -> TensorEntry:
    code = f.get(1, [1])[0]
    if code not in DTYPES:
        raise CheckpointError(f"tensor {name} in {path} has TensorFlow dtype {code}, which this reader does not handle",
                              "only numeric tensors can be imported")
    if f.get(7):
        raise CheckpointError(f"tensor {name} in {path} is partitioned into slices", "save it unpartitioned")
    dims: list[int] = []
    if f.get(2):
        shape = proto_fields(f[2][0])
        for d in shape.get(2, []):
            dims.append(_signed64(proto_fields(d).get(1, [0])[0]))
    return TensorEntry(name=name, dtype=DTYPES[code], shape=tuple(dims), shard=f.get(3, [0])[0],
                       offset=_signed64(f.get(4, [0])[0]), size=_signed64(f.get(5, [0])[0]))


def checkpoint_prefix(folder: str) -> str:
    """The checkpoint prefix in a folder: from its ``checkpoint`` file, else its only ``*.index``."""
    state = os.path.join(folder, "checkpoint")
    if os.path.isfile(state):
        with open(state, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model_checkpoint_path:"):
                    name = line.split(":", 1)[1].strip().strip('"')
                    prefix = name if os.path.isabs(name) else os.path.join(folder, name)
                    if os.path.isfile(prefix + ".index"):
                        return prefix
                    # the recorded path may be from another machine: try its basename here
                    local = os.path.join(folder, os.path.basename(name))
                    if os.path.isfile(local + ".index"):
                        return local
    indexes = sorted(n for n in os.listdir(folder) if n.endswith(".index"))
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0][: -len(".index")])
    if not indexes:
        raise CheckpointError(f"{folder} holds no TensorFlow checkpoint (no *.index file)",
                              "give the folder with model.ckpt.index and model.ckpt.data-00000-of-00001")
    raise CheckpointError(f"{folder} holds several checkpoints ({', '.join(indexes)})",
                          "keep one, or name it in the folder's 'checkpoint' file")


class TFCheckpoint:
    """A TensorFlow checkpoint opened for reading tensors one at a time."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        header, self.entries = read_index(prefix + ".index")
        self.num_shards = header.get(1, [1])[0] or 1
        for e in self.entries.values():
            numel = 1
            for d in e.shape:
                numel *= d
            itemsize = torch.empty((), dtype=e.dtype).element_size()
            if e.size != numel * itemsize:
                raise CheckpointError(
                    f"tensor {e.name} in {prefix}.index has {e.size} bytes for shape {list(e.shape)}",
                    "the checkpoint is damaged; copy it again",
                )
        for shard in range(self.num_shards):
            p = self.data_path(shard)
            if not os.path.isfile(p):
                raise CheckpointError(f"{p} is missing", "copy all of the checkpoint's files into the folder")

    def data_path(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def data_files(self) -> list[str]:
        return [self.data_path(s) for s in range(self.num_shards)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: e.shape for n, e in self.entries.items()}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype)."""
        e = self.entries[name]
        path = self.data_path(e.shard)
        buf = bytearray(e.size)
        with open(path, "rb") as f:
            f.seek(e.offset)
            n = f.readinto(buf)
        if n != e.size:
            raise CheckpointError(f"{path} is truncated (tensor {name} runs past its end)", "copy the checkpoint again")
        if e.size == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
