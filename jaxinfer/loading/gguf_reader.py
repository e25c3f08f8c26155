"""A small reader of GGUF headers: metadata, tensor directory, and a memory map of the data.

The layout (little-endian; ggml's docs/gguf.md): magic "GGUF", uint32 version (2 or 3), uint64
tensor count and key/value count, then the key/value pairs (string key, uint32
value type, value), then per tensor its name, uint32 n_dims, the dims (GGML `ne` order, fastest
first), uint32 ggml type and a uint64 offset into the data section, which starts at the next
multiple of `general.alignment` (default 32) after the directory.

Every read is bounds-checked, so a truncated or corrupt header fails with `GGUFFormatError`
(its message says what is wrong; `gguf.GGUFFile` adds the path). Parsing the 49,152-token
vocabulary of SmolLM2 takes tens of milliseconds here, against ~2 s for `gguf.GGUFReader`,
which builds numpy views of every string.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path

import numpy as np

# ggml type id -> (name, values per block, bytes per block); from ggml.h / gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# GGUF value type -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF header (the message says where and why)."""


class GGUFByteOrderError(GGUFFormatError):
    """A well-formed but big-endian GGUF, which is not supported."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory; `offset` is absolute (from the start of the file)."""

    name: str
    ne: tuple[int, ...]  # GGML order: fastest-varying dimension first
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        return int(np.prod(self.ne, dtype=np.int64)) // block * size


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{what} at byte {self.pos} runs past the end of the file "
                                  f"({self.size} bytes)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} at byte {start} is not UTF-8") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` length-prefixed strings (the vocabulary: the hot loop, kept lean)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise GGUFFormatError(f"{what} at byte {pos} runs past the end of the file")
                (n,) = unpack(buf, pos)
                end = pos + 8 + n
                if end > size:
                    raise GGUFFormatError(f"{what} at byte {pos} runs past the end of the file")
                out.append(buf[pos + 8 : end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} at byte {pos} is not UTF-8") from None
        self.pos = pos
        return out

    def value(self, type_id: int, what: str):
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            return self.array(what)
        if type_id not in _SCALARS:
            raise GGUFFormatError(f"{what} has unknown value type {type_id}")
        return self.scalar(_SCALARS[type_id], what)

    def array(self, what: str) -> list:
        type_id, count = self.scalar("I", what), self.scalar("Q", what)
        if count > self.size - self.pos:  # every element takes at least one byte
            raise GGUFFormatError(f"{what}: array of {count} values cannot fit in the file")
        if type_id == _STRING:
            return self.strings(count, what)
        if type_id == _ARRAY:
            return [self.array(what) for _ in range(count)]
        if type_id not in _NUMPY:
            raise GGUFFormatError(f"{what} has unknown array element type {type_id}")
        dtype = np.dtype(_NUMPY[type_id])
        start = self.take(count * dtype.itemsize, what)
        return np.frombuffer(self.buf, dtype, count, start).tolist()


@dataclasses.dataclass
class GGUFHeader:
    """What `read_header` found: metadata, tensors (file order), where data starts, and size."""

    version: int
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    data_start: int
    header_end: int  # end of the tensor directory (bytes [0, header_end) describe the file)
    file_size: int


def read_header(buf) -> GGUFHeader:
    """Parse a GGUF header from a bytes-like buffer (a whole file, or an mmap of one).

    GGUFFormatError for a bad magic number, an unknown version, a read past the end, or a tensor
    whose data would end past the end of `buf`; GGUFByteOrderError for a big-endian file.
    """
    cur = _Cursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFFormatError("bad magic number")
    cur.take(4, "magic")
    version = cur.scalar("I", "version")
    if version & 0xFFFF == 0:
        raise GGUFByteOrderError("byte-swapped (big-endian) GGUF is not supported")
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "key/value count")
    if max(n_tensors, n_kv) > cur.size:
        raise GGUFFormatError(f"{n_tensors} tensors / {n_kv} keys cannot fit in the file")
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise GGUFFormatError(f"metadata key {key} appears twice")
        metadata[key] = cur.value(cur.scalar("I", f"type of {key}"), f"metadata {key}")
    tensors = {}
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("I", f"tensor {name}")
        if n_dims > 8:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
        ne = tuple(cur.scalar("Q", f"tensor {name}") for _ in range(n_dims))
        type_id, offset = cur.scalar("I", f"tensor {name}"), cur.scalar("Q", f"tensor {name}")
        if type_id not in GGML_TYPES:
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {type_id}")
        tensors[name] = TensorInfo(name, ne, type_id, offset)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFFormatError(f"general.alignment = {alignment!r} is not a positive integer")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {n: dataclasses.replace(t, offset=data_start + t.offset) for n, t in tensors.items()}
    for t in tensors.values():
        if t.offset + t.n_bytes > cur.size:
            raise GGUFFormatError(f"tensor {t.name} ends at byte {t.offset + t.n_bytes}, past the "
                                  f"end of the file at {cur.size}")
    return GGUFHeader(version, metadata, tensors, data_start, cur.pos, cur.size)


def map_file(path: str | Path) -> tuple[mmap.mmap | bytes, np.ndarray]:
    """(a read-only mmap of the file, the same bytes as a uint8 numpy array, no copy).

    An empty file gives (b"", an empty array): mmap cannot map zero bytes.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return b"", np.zeros(0, np.uint8)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, np.frombuffer(mm, np.uint8)
