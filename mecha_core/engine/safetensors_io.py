"""Reading and writing safetensors files without trusting them.

A header is validated completely (JSON object, known dtypes, shapes, offsets that tile the data
area exactly) before any tensor is read; tensors are then read on demand from a memory map, so
an input costs page cache, not private memory.

The map is copy-on-write: a merge method that writes into an input tensor (a bug the engine
reports) changes a private copy of that page, never the file, and never faults.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import stat
import struct
import sys
import warnings
from typing import Any, Mapping

from ..lazy import torch

from ..errors import MechaError, SafetensorsError
from ..exiting import release_in_background
from ..files import os_error_text
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


def check_float_dtype(name: str, what: str) -> None:
    """Refuse a dtype name that is not a float one safetensors can store (``what`` names the
    option in the message)."""
    if name not in FLOAT_DTYPES:
        raise MechaError(f"{what} must be one of {', '.join(sorted(FLOAT_DTYPES))}; got '{name}'")

#: mmap's MAP_NORESERVE (in the module from Python 3.13): no swap is set aside for the pages of a
#: copy-on-write map, which are only ever read; without it Linux refuses a map larger than RAM
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux")
                     and platform.machine() in ("x86_64", "aarch64") else 0)


def _map_file(fd: int) -> tuple[mmap.mmap, bool]:
    """The whole file mapped copy-on-write where the system allows it (else read-only), and
    whether writes to it are possible."""
    try:
        if hasattr(mmap, "MAP_PRIVATE"):
            return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | _NORESERVE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE), True
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), True
    except OSError:  # strict overcommit accounting, say: a read-only map needs no reservation
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), False


#: the largest dimension torch can allocate (int64 sizes)
MAX_DIM = (1 << 63) - 1
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


def _short(value: Any, limit: int = 60) -> str:
    """A header value for an error message, cut so that a hostile header cannot flood the terminal."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "<a number too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _name(key: str) -> str:
    """A key as it appears in messages: quoted, and escaped and cut when it is not a plain name."""
    if key.isprintable() and len(key) <= 200:
        return f"'{key}'"
    return _short(key, 200)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict[str, _Entry], dict[str, str]]:
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        # json would keep the last entry silently; the first one's bytes would then be unexplained
        raise _bad(path, f"damaged safetensors header (key {_name(exc.args[0])} appears twice)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"damaged safetensors header (not JSON: {exc})") from None
    except (ValueError, RecursionError) as exc:  # absurd numbers or nesting: not a real header
        raise _bad(path, f"damaged safetensors header (unreadable JSON: {type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"damaged safetensors header (a JSON {type(header).__name__}, not an object)")
    try:  # "\ud800" is valid JSON but no UTF-8 text: the output header could not be written
        json.dumps(header, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise _bad(path, "damaged safetensors header (a lone UTF-16 surrogate escape in a name or "
                         "value)") from None
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "damaged safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, _Entry] = {}
    for key, value in header.items():
        if not isinstance(value, dict):
            raise _bad(path, f"key {_name(key)}: header entry is not an object")
        code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise _bad(path, f"key {_name(key)}: unknown dtype {_short(code)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and 0 <= d <= MAX_DIM for d in shape):
            raise _bad(path, f"key {_name(key)}: invalid shape {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _bad(path, f"key {_name(key)}: invalid data_offsets {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise _bad(path, f"key {_name(key)}: data_offsets {_short(offsets)} outside the data area "
                             f"({data_size} bytes; is the file truncated?)")
        name, size = DTYPES[code]
        info = TensorInfo(tuple(shape), name)
        expected = info.numel * size
        if end - begin != expected:
            raise _bad(path, f"key {_name(key)}: shape {_short(shape)} of {code} needs "
                             f"{_short(expected)} bytes, data_offsets give {_short(end - begin)}")
        entries[key] = _Entry(info, begin, end)
    position = 0
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else "leaves a hole before it"
            raise _bad(path, f"key {_name(key)}: data_offsets {[entry.begin, entry.end]} {what}")
        position = entry.end
    if position != data_size:
        raise _bad(path, f"{data_size - position} bytes after the last tensor; the file is damaged")
    return entries, metadata


def _not_safetensors(first: bytes, n: int, size: int) -> str:
    """Why a file whose header length does not fit is not safetensors (checked only then, since
    a valid header length may happen to start with the same bytes as a zip or a pickle)."""
    if first[:4] == b"PK\x03\x04":
        return ("is a zip file (a torch.save checkpoint?), not safetensors; pickle checkpoints are "
                "not loaded (unpickling can run code): convert it to .safetensors first")
    if first[0] == 0x80 and 2 <= first[1] <= 5:
        return ("is a pickle checkpoint, not safetensors; pickles are not loaded (unpickling can "
                "run code): convert it to .safetensors first")
    if all(32 <= b < 127 or b in b"\t\r\n" for b in first):
        return f"not a safetensors file (it starts with text: {first.decode('ascii')!r})"
    return f"not a safetensors file (header length {n} exceeds the file's {size} bytes)"


class SafetensorsFile:
    """A safetensors file opened lazily: the header now, each tensor when asked for."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._map: mmap.mmap | None = None
        self._writable = False
        p = self.path
        if p.lower().endswith(PICKLE_SUFFIXES):
            raise _bad(p, "pickle checkpoints are not loaded (unpickling can run code); convert it "
                          "to .safetensors first, e.g. with safetensors.torch.save_file on a "
                          "torch.load(..., weights_only=True) state dict")
        try:
            st = os.stat(p)
            if stat.S_ISDIR(st.st_mode):
                raise _bad(p, "is a directory, not a safetensors file")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
                raise _bad(p, "is not a regular file")
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise _bad(p, "no such file") from None
        except PermissionError:
            raise _bad(p, "permission denied") from None
        except IsADirectoryError:
            raise _bad(p, "is a directory, not a safetensors file") from None
        except OSError as exc:  # a link loop, a name too long ...: in words
            raise _bad(p, f"cannot open: {os_error_text(exc)}") from None
        except ValueError:  # a NUL byte in the path
            raise _bad(_short(p), "not a valid file name") from None
        try:
            opened = os.fstat(fd)
            size = opened.st_size
            self._identity = (opened.st_dev, opened.st_ino)
            if size < 8:
                raise _bad(p, f"not a safetensors file ({size} bytes; too short for a header)")
            first = os.pread(fd, 8, 0)
            (n,) = struct.unpack("<Q", first)
            if n > size - 8:
                raise _bad(p, _not_safetensors(first, n, size))
            if n > MAX_HEADER:
                raise _bad(p, f"header of {n} bytes is too large (at most {MAX_HEADER})")
            raw = os.pread(fd, n, 8)
            self.data_start = 8 + n
            self._entries, self.metadata = _parse_header(p, raw, size - self.data_start)
            if size > 0 and self._entries:
                self._map, self._writable = _map_file(fd)
        finally:
            os.close(fd)
        self.keys: dict[str, TensorInfo] = {k: e.info for k, e in self._entries.items()}

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.keys)} keys)"

    def nbytes(self, key: str) -> int:
        e = self._entries[key]
        return e.end - e.begin

    def read(self, key: str) -> torch.Tensor:
        """The tensor, viewing the memory map (no copy). Writes to it would change this
        process's copy of the page only, but nothing should write to it: a merge reads each
        input's pages from every step that uses them."""
        entry = self._entries[key]
        info = entry.info
        if info.numel == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        assert self._map is not None
        self._check_still_there(entry.end)
        dtype, offset = torch_dtype(info.dtype), self.data_start + entry.begin
        if self._writable:
            flat = torch.frombuffer(self._map, dtype=dtype, count=info.numel, offset=offset)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the buffer is read-only; nobody writes to it
                flat = torch.frombuffer(self._map, dtype=dtype, count=info.numel, offset=offset)
        return flat.view(info.shape)

    def _check_still_there(self, end: int) -> None:
        """Refuse to touch bytes that another program has truncated away since the file was
        opened: reading a mapped page past the end of a file kills the process (SIGBUS), leaving
        the temporary output behind. A file replaced by a new one (a new inode) is harmless: the
        mapping keeps the old one. A truncation in the moment between this check and the read
        can still crash; the check makes that a window of milliseconds, not the whole merge."""
        try:
            now = os.stat(self.path)
        except OSError:  # deleted or renamed: the mapping still holds the file's pages
            return
        if (now.st_dev, now.st_ino) == self._identity and now.st_size < self.data_start + end:
            raise _bad(self.path, f"the file shrank to {now.st_size} bytes while it was being read "
                                  f"(another program is writing it?); run the merge again once it is complete")

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading a tensor (elements ``start:stop``) in the background."""
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        entry = self._entries[key]
        size = ITEMSIZE[entry.info.dtype]
        begin = self.data_start + entry.begin + start * size
        end = self.data_start + (entry.end if stop is None else entry.begin + stop * size)
        aligned = begin - begin % mmap.PAGESIZE
        if end > aligned:
            try:
                self._map.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)
            except (OSError, ValueError):  # advice only; reading still works without it
                pass

    def copy_to(self, key: str, fd: int, position: int, start: int = 0, stop: int | None = None) -> bool:
        """Copy the stored bytes of elements ``start:stop`` of ``key`` to ``fd`` at ``position``
        file to file (``copy_file_range``: the bytes never enter this process; a reflink or a
        page-cache copy in the kernel). ``False`` when that cannot be done here (the file was
        replaced or truncated, or the kernel or filesystem refuses): the caller writes the bytes
        itself then."""
        if not hasattr(os, "copy_file_range"):
            return False
        entry = self._entries[key]
        size = ITEMSIZE[entry.info.dtype]
        begin = self.data_start + entry.begin + start * size
        end = self.data_start + (entry.end if stop is None else entry.begin + stop * size)
        try:
            src = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            opened = os.fstat(src)
            if (opened.st_dev, opened.st_ino) != self._identity or opened.st_size < end:
                return False
            while begin < end:
                done = os.copy_file_range(src, fd, end - begin, begin, position)
                if done <= 0:
                    return False
                begin, position = begin + done, position + done
            return True
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                return False
            raise
        finally:
            os.close(src)

    def close(self) -> None:
        # Not mmap.close(): torch.frombuffer keeps the map object alive but exports no buffer,
        # so closing would unmap pages that a tensor still views (one kept by an exception's
        # traceback, say) and touching it would crash. Dropped, the map is unmapped when the
        # last tensor viewing it is freed: at once when there is none, on a thread, as unmapping
        # the pages a merge read takes ~0.1 s per GB that the caller need not wait for.
        mapped, self._map = self._map, None
        if mapped is not None:
            release_in_background(mapped)


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
    """The tensor's raw little-endian bytes (CPU, contiguous), without a copy.

    A ctypes array over the tensor's memory, not ``.numpy()``: numpy is not a dependency (torch
    runs without it), and this is as fast. The array holds the tensor, so the view keeps the
    memory alive as long as it is used."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    raw = (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())
    raw._tensor = t  # type: ignore[attr-defined]  # the memory must outlive every view of it
    return memoryview(raw).cast("B")


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
         metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (small helper for tests, examples and the writers of LoRAs)."""
    infos = {k: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()}
    head, offsets = build_header(infos, metadata or {})
    with open(path, "wb") as f:
        f.write(head)
        for key in output_order(infos):
            f.write(tensor_bytes(tensors[key]))
