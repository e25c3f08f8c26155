"""Reading safetensors files without pickle and without loading them whole.

The format: an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw bytes. Files are memory-mapped and validated
(header, offsets inside the file, sizes matching shapes) before any tensor is used, so a
truncated or corrupt file fails with one clear error naming it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxinfer.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One memory-mapped .safetensors file: `names()`, `shape(name)`, `get(name) -> np.ndarray`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file or truncated (header length {n} "
                        f"does not fit in a file of {size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = {}
        for name, info in header.items():
            self._entries[name] = self._validate(name, info, size - self._start)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 0 else None

    def _validate(self, name, info, data_size):
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unsupported dtype or missing field {e}; "
                f"supported dtypes: {', '.join(DTYPES)}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed entry") from None
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has {end - begin} bytes, expected {expected} "
                f"for shape {shape}")
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated (tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes)")
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read_data(self, chunk: int = 8 << 20):
        """The data section's bytes in pieces of at most `chunk` bytes, read from the file, not
        through the map: pages touched through the map count in this process's resident memory
        until it is dropped, so a pass over every byte (a checksum) would add the whole file to
        the peak even where most of it is never used."""
        buf = bytearray(chunk)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start)
            while n := f.readinto(buf):
                yield memoryview(buf)[:n]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        raw = self._mmap[self._start + begin:self._start + end]
        return raw.view(dtype).reshape(shape)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as a safetensors file (used by tests and checkpoint saving)."""
    inverse = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        nbytes = arr.nbytes
        header[name] = {"dtype": inverse[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(arr)
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad the header (with spaces, as the format allows) so the data starts 64-byte aligned:
    # jax.device_put then aliases a memory-mapped tensor instead of copying it, when the
    # tensor's own offset is a multiple of 64 too.
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in blobs:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
