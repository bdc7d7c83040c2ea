"""Small C kernels compiled on first use, cached per machine and loaded with ctypes: see
:mod:`mecha_core.native` (the engine's own kernels use it too)."""

from __future__ import annotations

from ..native import FLAGS, cache_folder, function, load, why_not

__all__ = ["FLAGS", "cache_folder", "function", "load", "why_not"]
