"""A safetensors file memory-mapped, its tensors views of the mapping (issue 15, many tasks).

``safetensors``' own readers (``safe_open(...).get_tensor``, ``load_file``) copy every tensor into
memory. :func:`map_safetensors` instead maps the file once, privately (``mmap.ACCESS_COPY``), and
returns each tensor as ``torch.frombuffer`` over the mapping at its data offset: no byte is read
until a computation touches it, and the OS keeps the pages as (evictable) page cache. The header
(8-byte little-endian length, then JSON) is read from the mapping and checked whole before any
tensor is made: every entry's dtype, shape and offsets, offsets that tile the data exactly (no
gap, no overlap, nothing after), each tensor aligned to its dtype in memory.

The mapping lives as long as any tensor made from it. The file must not be changed in place while
mapped (a truncated file raises SIGBUS on the next read of a lost page; bytes rewritten in place
may show through). Replacing it by rename, as softtf's atomic writes do, is safe: the mapping keeps
the old file. Writes into a mapped tensor stay private to the process (copy on write), never
reach the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import torch
from torch import Tensor

__all__ = ["DTYPES", "map_safetensors"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100_000_000  # safetensors' own limit


def _header(mapped: mmap.mmap, size: int, path: str) -> tuple[int, dict]:
    if size < 8:
        raise ValueError(f"{path!r} is {size} bytes, shorter than a safetensors header length")
    (length,) = struct.unpack("<Q", mapped[:8])
    if length > MAX_HEADER or 8 + length > size:
        raise ValueError(f"{path!r} declares a {length}-byte header in a {size}-byte file")
    try:
        header = json.loads(bytes(mapped[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} has a header that is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} has a header that is not a JSON object")
    return 8 + length, header


def _entries(header: dict, data_size: int, start: int, path: str) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """name -> (dtype, shape, byte offset in the file), every entry checked."""
    out, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path!r}: tensor {name!r} has header entry {entry!r} (needs dtype, shape, data_offsets)")
        dtype, shape, offsets = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has dtype {entry['dtype']!r}, not one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{path!r}: tensor {name!r} has shape {shape!r} (needs a list of sizes >= 0)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path!r}: tensor {name!r} has data_offsets {offsets!r} (needs [begin, end], 0 <= begin <= end)")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{path!r}: tensor {name!r} ({entry['dtype']} {shape}) needs {nbytes} bytes, "
                             f"its data_offsets {offsets} hold {offsets[1] - offsets[0]}")
        if (start + offsets[0]) % dtype.itemsize:
            raise ValueError(f"{path!r}: tensor {name!r} starts at byte {start + offsets[0]}, not aligned to its "
                             f"{dtype.itemsize}-byte dtype, so it cannot be memory-mapped (load it with mmap=False)")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, shape, start + offsets[0])
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"{path!r}: tensor {name!r} begins at data byte {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != data_size:
        raise ValueError(f"{path!r}: its tensors cover {end} data bytes, the file holds {data_size}")
    return out


def map_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file at ``path``; every tensor a view of one
    private, read-on-touch mapping of it (see the module's doc). Raises ValueError naming the file
    and what is wrong before any tensor is made."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path!r} is empty, not a safetensors file")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    start, header = _header(mapped, size, path)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path!r}: __metadata__ must map strings to strings")
    tensors = {}
    for name, (dtype, shape, offset) in _entries(header, size - start, start, path).items():
        count = math.prod(shape)
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(shape)
    return tensors, metadata
