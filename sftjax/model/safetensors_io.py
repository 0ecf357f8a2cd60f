"""Read and write the safetensors format with numpy (bfloat16 included, through ml_dtypes).

Format: 8 bytes little-endian header length n, n bytes of JSON header {name: {dtype, shape, data_offsets}} (plus
an optional "__metadata__" of strings), then the raw little-endian tensor bytes. Reading memory-maps the file: a
tensor costs no memory until it is used. No pickle, no code execution.

(The `safetensors` package's numpy backend has no bfloat16, which most checkpoints on disk are stored in.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from sftjax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data) of a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(raw, "little")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as read-only numpy arrays backed by a memory map."""
    path = Path(path)
    header, start = read_header(path)
    data_size = path.stat().st_size - start
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_size,)) if data_size else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry "
                                  f"{info!r}") from None
        if not 0 <= begin <= end <= data_size or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets {[begin, end]} that do not match "
                                  f"its shape {list(shape)} and dtype {info['dtype']}")
        raw = data[begin:end] if data is not None else np.zeros(0, np.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (numpy arrays of a supported dtype) to `path`."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
