"""Synthetic checkpoints in real layouts, for tests of mecha and of plugins built on it.

Any :class:`~mecha_core.specs.Architecture` gives a key table (:func:`key_table`: key -> (shape,
dtype), all keys or a chosen few, floating-point keys in a chosen dtype); a key table gives a file:

- :func:`write_header_only` writes a valid safetensors header for any key table and extends the
  file to its full size without writing data (a sparse file): enough for detection and
  ``mecha inspect``, at no disk cost even for a 16 GB layout.
- :func:`write_layout` writes a real checkpoint, one tensor at a time (memory stays small), with
  pseudo-random values taken from a fixed pool, so a 5 GB file is written at disk speed and the
  same arguments give the same bytes; :func:`layout_values` recomputes any key's tensor.

Both write the safetensors format directly (not through mecha's writer), so tests that use them
check mecha's reader against an independent writer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

from mecha_core.lazy import torch

from ..specs import Architecture

_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_POOL_SIZE = 1 << 22


def _header(table: Mapping[str, tuple[tuple[int, ...], str]], metadata: Mapping[str, str] | None
            ) -> tuple[bytes, list[tuple[str, int]]]:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    order, position = [], 0
    for key, (shape, dtype) in table.items():
        size = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [position, position + size]}
        order.append((key, size))
        position += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_header_only(path: str | os.PathLike[str], table: Mapping[str, tuple[tuple[int, ...], str]],
                      metadata: Mapping[str, str] | None = None) -> str:
    """A safetensors file with ``table`` (key -> (shape, dtype)) whose data area is a hole."""
    head, order = _header(table, metadata)
    with open(path, "wb") as f:
        f.write(head)
    os.truncate(path, len(head) + sum(size for _, size in order))
    return os.fspath(path)


def _pool(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(_POOL_SIZE, generator=g) * 0.05).to(dtype)


def layout_values(key_index: int, shape: tuple[int, ...], dtype: str, seed: int = 0) -> torch.Tensor:
    """The tensor :func:`write_layout` writes for the ``key_index``-th key of its table: small
    normal values (std 0.05) for floating-point dtypes, ``0, 1, 2, ...`` for integer ones."""
    torch_dtype = getattr(torch, dtype)
    n = math.prod(shape)
    if not torch_dtype.is_floating_point:
        return torch.arange(n, dtype=torch_dtype).reshape(shape)
    if n == 0:  # an empty tensor takes nothing from the pool
        return torch.empty(shape, dtype=torch_dtype)
    pool = _pool_cached(seed, dtype)
    start = (key_index * 7919 + seed * 104729) % _POOL_SIZE
    pieces, need = [], n
    while need:
        take = min(need, _POOL_SIZE - start)
        pieces.append(pool[start:start + take])
        need -= take
        start = 0
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out.reshape(shape)


_POOLS: dict[tuple[int, str], torch.Tensor] = {}


def _pool_cached(seed: int, dtype: str) -> torch.Tensor:
    if (seed, dtype) not in _POOLS:
        _POOLS[(seed, dtype)] = _pool(seed, getattr(torch, dtype))
    return _POOLS[(seed, dtype)]


def write_layout(path: str | os.PathLike[str], table: Mapping[str, tuple[tuple[int, ...], str]],
                 seed: int = 0, metadata: Mapping[str, str] | None = None) -> str:
    """A real checkpoint with ``table``'s keys (key -> (shape, dtype)), in the table's order; key
    number ``i`` holds ``layout_values(i, shape, dtype, seed)``."""
    head, order = _header(table, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for i, (shape, dtype) in enumerate(table.values()):
            t = layout_values(i, tuple(shape), dtype, seed).contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
    return os.fspath(path)


def key_table(arch: Architecture, keys: Iterable[str] | None = None, dtype: str | None = None
              ) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) for ``keys`` of an architecture (default: its required keys, in
    layout order); floating-point keys get ``dtype`` when given, integer buffers keep theirs."""
    wanted = list(keys) if keys is not None else [k for k, s in arch.keys.items() if not s.optional]
    out = {}
    for k in wanted:
        spec = arch.keys[k]
        float_key = getattr(torch, spec.dtype).is_floating_point
        out[k] = (tuple(spec.shape), dtype if dtype and float_key else spec.dtype)
    return out
