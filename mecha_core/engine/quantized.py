"""Scaled fp8 checkpoints: dequantised when read, written on request.

ComfyUI's ``fp8_scaled`` files (and other per-tensor fp8 exports) store a weight ``x.weight`` in
float8 with its scale beside it, ``x.scale_weight`` or ``x.weight_scale``: the real weight is
``weight.float() * scale`` (a scalar scale, or one per output row). Merging the stored values as
they are averages the fp8 codes and the scales separately, which is wrong by tens of percent, so
:func:`dequantizing` wraps such a file: each scaled weight reads as its real float32 values, and
the scales (with the activation scales ``x.scale_input``/``x.input_scale`` that go with them and
ComfyUI's ``scaled_fp8`` marker key) leave the key table. Methods only ever see real weights.

:func:`write_fp8_scaled` writes a finished merge in that form: every float weight matrix
(``*.weight`` with 2 or more dimensions) as fp8 with a float32 ``scale_weight`` (its largest
magnitude over the format's largest finite value), other float keys in bfloat16 (norms and biases
are small, and fp8 would round them hard), plus the ``scaled_fp8`` marker ComfyUI looks for under
the diffusion model's prefix. One tensor is held at a time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping

from ..errors import PlanError
from ..lazy import torch
from ..specs import TensorInfo
from .direct_write import pwrite_all
from .safetensors_io import ITEMSIZE, SafetensorsFile, build_header, is_float, tensor_bytes, torch_dtype

if TYPE_CHECKING:
    from .folders import FolderFile

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
#: the names of a weight's scale, after ``x.``: ComfyUI's and the other common spelling
SCALE_NAMES = ("scale_weight", "weight_scale")
#: activation scales that only mean something next to an fp8 weight
INPUT_SCALE_NAMES = ("scale_input", "input_scale")
#: ComfyUI's marker key (an empty fp8 tensor) saying a file holds scaled fp8 weights
MARKER = "scaled_fp8"
#: the dtype a dequantised weight reads as: fp8 code times a float32 scale is exact in float32
DEQUANTISED_DTYPE = "float32"


def scaled_weights(keys: Mapping[str, TensorInfo]) -> dict[str, str]:
    """``{weight key: its scale key}`` for every fp8 ``*.weight`` that has a scale beside it."""
    found = {}
    for key, info in keys.items():
        if info.dtype not in FP8_DTYPES or not key.endswith("weight"):
            continue
        base = key[: -len("weight")]
        scale = next((base + s for s in SCALE_NAMES if base + s in keys), None)
        if scale is not None:
            found[key] = scale
    return found


class DequantisedFile:
    """A safetensors file whose scaled fp8 weights read as real weights (see the module doc).
    It has the reader's interface (``path``, ``keys``, ``metadata``, ``read``, ``prefetch``,
    ``close``); ``direct`` is false: a weight is computed whole, not read in slices."""

    direct = False

    def __init__(self, file: SafetensorsFile | FolderFile, scales: Mapping[str, str]):
        self.file, self.scales = file, dict(scales)
        self.path, self.metadata = file.path, file.metadata
        dropped = set(self.scales.values())
        for weight in self.scales:
            base = weight[: -len("weight")]
            dropped.update(base + s for s in INPUT_SCALE_NAMES)
        dropped.update(k for k in file.keys if k == MARKER or k.endswith("." + MARKER))
        for weight, scale in self.scales.items():  # a bad scale is bad input: refused before any read
            n, rows = file.keys[scale].numel, (file.keys[weight].shape or (1,))[0]
            if n not in (1, rows) or not is_float(file.keys[scale].dtype):
                raise PlanError(f"{file.path}: key '{scale}' ({list(file.keys[scale].shape)}, "
                                f"{file.keys[scale].dtype}) is not a scale of '{weight}': expected one float "
                                f"or one per row ({rows})")
        self.keys = {k: TensorInfo(info.shape, DEQUANTISED_DTYPE) if k in self.scales else info
                     for k, info in file.keys.items() if k not in dropped}

    def read(self, key: str) -> torch.Tensor:
        value = self.file.read(key)
        scale_key = self.scales.get(key)
        if scale_key is None:
            return value
        scale = self.file.read(scale_key).to(torch.float32)
        weight = value.to(torch.float32)
        if scale.numel() == 1:
            return weight * scale.reshape(())
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self.file.prefetch(key)  # whole: the slice bounds count dequantised elements, not stored ones

    def close(self) -> None:
        self.file.close()


def dequantising(file: SafetensorsFile | FolderFile) -> SafetensorsFile | FolderFile | DequantisedFile:
    """``file`` itself, or seen through :class:`DequantisedFile` when it holds scaled fp8 weights
    (a single file, or a folder's shards read as one)."""
    scales = scaled_weights(file.keys)
    return DequantisedFile(file, scales) if scales else file


# -- writing --------------------------------------------------------------------------------------

def _scaled(key: str, info: TensorInfo) -> bool:
    return is_float(info.dtype) and key.endswith(".weight") and len(info.shape) >= 2


def fp8_layout(keys: Mapping[str, TensorInfo], fp8: str) -> dict[str, TensorInfo]:
    """The output key table of :func:`write_fp8_scaled` for a merge with ``keys``."""
    out: dict[str, TensorInfo] = {}
    for key, info in keys.items():
        if _scaled(key, info):
            out[key] = TensorInfo(info.shape, fp8)
            out[key[: -len("weight")] + SCALE_NAMES[0]] = TensorInfo((), "float32")
        elif is_float(info.dtype):
            out[key] = TensorInfo(info.shape, "bfloat16")
        else:
            out[key] = info
    prefixes = {"model.diffusion_model."} if any(k.startswith("model.diffusion_model.") for k in keys) else {""}
    for prefix in prefixes:
        out[prefix + MARKER] = TensorInfo((0,), fp8)
    return out


def quantise(weight: torch.Tensor, fp8: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` with ``codes.float() * scale ≈ weight``: one float32 scale per tensor,
    mapping its largest magnitude to the format's largest finite value."""
    dtype = torch_dtype(fp8)
    w = weight.to(torch.float32)
    amax = float(w.abs().max()) if w.numel() else 0.0
    scale = torch.tensor(amax / torch.finfo(dtype).max if amax > 0 else 1.0, dtype=torch.float32)
    return (w / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale


def write_fp8_scaled(source: str | os.PathLike[str], fd: int, fp8: str) -> None:
    """Write the safetensors file ``source`` (a finished merge) to the open file ``fd`` in scaled
    fp8 (see the module doc), keeping its metadata; one tensor in memory at a time."""
    file = SafetensorsFile(source)
    try:
        layout = fp8_layout(file.keys, fp8)
        header, offsets = build_header(layout, file.metadata)
        os.ftruncate(fd, len(header) + sum(i.numel * ITEMSIZE[i.dtype] for i in layout.values()))
        os.pwrite(fd, header, 0)

        def put(key: str, tensor: torch.Tensor) -> None:
            pwrite_all(fd, tensor_bytes(tensor.contiguous()), len(header) + offsets[key])

        for key, info in file.keys.items():
            value = file.read(key)
            if _scaled(key, info):
                codes, scale = quantise(value, fp8)
                put(key, codes)
                put(key[: -len("weight")] + SCALE_NAMES[0], scale)
            else:
                put(key, value.to(torch_dtype(layout[key].dtype)))
            del value
    finally:
        file.close()
