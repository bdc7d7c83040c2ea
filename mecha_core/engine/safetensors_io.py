"""Reading and writing safetensors files without trusting them.

A header is validated completely (JSON object, known dtypes, shapes, offsets that tile the data
area exactly) before any tensor is read; tensors are then read on demand from a memory map, so
an input costs page cache, not private memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from typing import Any, Mapping

import torch

from ..errors import SafetensorsError
from ..specs import TensorInfo

#: safetensors dtype code -> (torch dtype name, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
CODES = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE = {name: size for name, size in DTYPES.values()}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


class _Entry:
    __slots__ = ("info", "begin", "end")

    def __init__(self, info: TensorInfo, begin: int, end: int):
        self.info, self.begin, self.end = info, begin, end


def _bad(path: str, why: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: {why}")


def _parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict[str, _Entry], dict[str, str]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"damaged safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"damaged safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "damaged safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, _Entry] = {}
    for key, value in header.items():
        if not isinstance(value, dict):
            raise _bad(path, f"key '{key}': header entry is not an object")
        code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if code not in DTYPES:
            raise _bad(path, f"key '{key}': unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, f"key '{key}': invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _bad(path, f"key '{key}': invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise _bad(path, f"key '{key}': data_offsets {offsets} outside the data area "
                             f"({data_size} bytes; is the file truncated?)")
        name, size = DTYPES[code]
        expected = math.prod(shape) * size
        if end - begin != expected:
            raise _bad(path, f"key '{key}': shape {shape} of {code} needs {expected} bytes, "
                             f"data_offsets give {end - begin}")
        entries[key] = _Entry(TensorInfo(tuple(shape), name), begin, end)
    position = 0
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else "leaves a hole before it"
            raise _bad(path, f"key '{key}': data_offsets {[entry.begin, entry.end]} {what}")
        position = entry.end
    if position != data_size:
        raise _bad(path, f"{data_size - position} bytes after the last tensor; the file is damaged")
    return entries, metadata


class SafetensorsFile:
    """A safetensors file opened lazily: the header now, each tensor when asked for."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._map: mmap.mmap | None = None
        p = self.path
        if p.lower().endswith(PICKLE_SUFFIXES):
            raise _bad(p, "pickle checkpoints are not loaded (unpickling can run code); convert it "
                          "to .safetensors first, e.g. with safetensors.torch.save_file on a "
                          "torch.load(..., weights_only=True) state dict")
        try:
            if os.path.isdir(p):
                raise _bad(p, "is a directory, not a safetensors file")
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise _bad(p, "no such file") from None
        except PermissionError:
            raise _bad(p, "permission denied") from None
        except IsADirectoryError:
            raise _bad(p, "is a directory, not a safetensors file") from None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise _bad(p, f"not a safetensors file ({size} bytes; too short for a header)")
            first = os.pread(fd, 8, 0)
            if first[:2] == b"PK":
                raise _bad(p, "is a zip (pickle) checkpoint, not safetensors; convert it to "
                              ".safetensors first")
            (n,) = struct.unpack("<Q", first)
            if n > min(MAX_HEADER, size - 8):
                raise _bad(p, f"not a safetensors file (header length {n} exceeds the file's "
                              f"{size} bytes)" if n > size - 8 else f"header of {n} bytes is too large")
            raw = os.pread(fd, n, 8)
            self.data_start = 8 + n
            self._entries, self.metadata = _parse_header(p, raw, size - self.data_start)
            if size > 0 and self._entries:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.keys: dict[str, TensorInfo] = {k: e.info for k, e in self._entries.items()}

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.keys)} keys)"

    def info(self, key: str) -> TensorInfo:
        return self._entries[key].info

    def nbytes(self, key: str) -> int:
        e = self._entries[key]
        return e.end - e.begin

    def read(self, key: str) -> torch.Tensor:
        """The tensor, viewing the memory map (no copy). Treat it as read-only."""
        entry = self._entries[key]
        info = entry.info
        if info.numel == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        assert self._map is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the buffer is read-only; nobody writes to it
            flat = torch.frombuffer(self._map, dtype=torch_dtype(info.dtype), count=info.numel,
                                    offset=self.data_start + entry.begin)
        return flat.view(info.shape)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it; the map closes when that is freed
                pass
            self._map = None


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Keys with shapes and dtypes, and the metadata, of a safetensors file (header only)."""
    f = SafetensorsFile(path)
    try:
        return dict(f.keys), dict(f.metadata)
    finally:
        f.close()


def output_order(infos: Mapping[str, TensorInfo]) -> list[str]:
    """The order the reference writer uses: larger item sizes first, then by name."""
    return sorted(infos, key=lambda k: (-ITEMSIZE[infos[k].dtype], k))


def build_header(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes (padded to 8 with spaces) and each key's offset in the data area."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    position = 0
    for key in output_order(infos):
        info = infos[key]
        size = info.numel * ITEMSIZE[info.dtype]
        header[key] = {"dtype": CODES[info.dtype], "shape": list(info.shape),
                       "data_offsets": [position, position + size]}
        offsets[key] = position
        position += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes (CPU, contiguous)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
         metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (small helper for tests, examples and the writers of LoRAs)."""
    infos = {k: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()}
    head, offsets = build_header(infos, metadata or {})
    with open(path, "wb") as f:
        f.write(head)
        for key in output_order(infos):
            f.write(tensor_bytes(tensors[key]))
