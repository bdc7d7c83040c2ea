"""A GGUF file as mecha reads it: the key table from the header, each tensor dequantised on read.

``gguf.GGUFReader`` parses the header and maps the data (a numpy memory map), so opening a file
reads no tensor; :meth:`GGUFFile.read` turns one tensor's blocks into float32 with
:mod:`mecha_gguf.dequant`, a slice of blocks at a time, so memory stays one tensor.

Names are kept as the file writes them. city96's Flux GGUF files use Black Forest Labs' names
(``double_blocks.0.img_attn.qkv.weight``): the ``flux-dev`` layout lists those as aliases, so the
file is detected and renamed like BFL's own safetensors. Shapes are given in torch's order (GGUF
stores them innermost first). Quantised tensors read as float32 (exact: a float16 scale times a
small integer code); F32/F16/BF16 as they are.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from mecha_core.errors import MechaError
from mecha_core.specs import TensorInfo

from .dequant import BLOCK_TYPES, PLAIN_TYPES, dequantize

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class GGUFFile:
    """An opened GGUF file: ``keys``, ``metadata``, ``read(key)``, ``close()``."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf's parser reports bad bytes so
            raise ValueError(f"not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self._tensors: dict[str, Any] = {}
        self.keys: dict[str, TensorInfo] = {}
        for tensor in self._reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in PLAIN_TYPES and kind not in BLOCK_TYPES:
                raise MechaError(f"{path}: tensor '{tensor.name}' is {kind}, which mecha-gguf does not "
                                 f"read (it reads {', '.join([*PLAIN_TYPES, *BLOCK_TYPES])})")
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self._tensors[tensor.name] = tensor
            self.keys[tensor.name] = TensorInfo(shape, DTYPE_NAMES.get(kind, "float32"))
        self.metadata: dict[str, str] = {}
        architecture = self._reader.fields.get("general.architecture")
        if architecture is not None:
            self.metadata["gguf.architecture"] = bytes(architecture.parts[architecture.data[0]]).decode(
                "utf-8", "replace")

    def read(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the map is read-only, and nothing writes to it
            data = torch.from_numpy(raw)
        return dequantize(data, tensor.tensor_type.name, self.keys[key].shape)

    def stored_dtype(self, key: str) -> str:
        """The tensor's type as stored (``Q4_K``, ``float16`` ...), which ``mecha inspect`` shows."""
        kind = self._tensors[key].tensor_type.name
        return DTYPE_NAMES.get(kind, kind)

    def nbytes(self, key: str) -> int:
        """The tensor's stored bytes (quantised blocks as they are in the file)."""
        return int(self._tensors[key].n_bytes)

    def close(self) -> None:
        self._tensors.clear()
        mapped = getattr(self._reader, "data", None)
        mmap = getattr(mapped, "_mmap", None)
        if mmap is not None:
            try:
                mmap.close()
            except BufferError:  # a tensor read from it is still alive; the map closes with it
                pass
