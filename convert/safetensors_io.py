"""Reading and writing the safetensors format with numpy, bfloat16 included.

The `safetensors` package's numpy backend has no bfloat16 (Ettin checkpoints may be bf16), so
the format, a JSON header and then raw little-endian bytes, is read here with a memory map.
Nothing is loaded until a tensor is asked for, and a slice of a memory-mapped tensor reads
only its own bytes. Every offset is checked against the file, so a corrupt or truncated file
is an error that names the file and the tensor, never garbage numbers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointFormatError(ValueError):
    """A checkpoint file that is corrupt, truncated or not what it claims to be."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to a memory-mapped numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointFormatError(
                    f"{self.path}: header length {n} does not fit in a file of {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}"
                ) from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name!r} has offsets {begin}..{end} that do not match "
                    f"its shape {shape} and dtype {entry['dtype']}"
                )
            if end > data_size:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name!r} ends at byte {self._start + end} but the file "
                    f"has {size} bytes (truncated)"
                )
            self._entries[name] = (dtype, shape, begin)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start else None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        raw = self._map[self._start + begin : self._start + begin + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes `tensors` as safetensors (sorted by name, 8-byte aligned header)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    arrays = {}
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        arrays[name] = array
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
