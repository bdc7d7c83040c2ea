"""Weighted sum and add-difference of one slice as one C loop (``mecha_core.kit.native``), bit
for bit the eager expressions in :mod:`mecha_methods.basic`.

Eager torch makes three passes for ``a * (1 - alpha) + b * alpha`` (two products into fresh
tensors, then their sum), each allocating and faulting in a slice: 1.4 ms for 699,050 float32
elements on the bench machine, against about 0.3 ms for one loop that reads both inputs once.
Each element gets the eager path's operations in its order, rounded as it rounds
(``-ffp-contract=off``: no fused multiply-add): the coefficients are rounded to float32 first, as
torch rounds a Python number multiplied into a float32 tensor.

Anything else (other dtypes, CUDA, shapes that broadcast, a coefficient that is not a finite
float32) is left to the caller's eager expression (``None``), and so is a slice where some result
is NaN: which NaN (sign, payload) an operation passes on depends on the operand order of the
instructions each build chose, so there only torch gives torch's bytes.
"""

from __future__ import annotations

import ctypes
import math
import struct
from typing import Any

from mecha_core.lazy import torch

from mecha_core.kit import native

from ._native import plain_float32

SOURCE = r"""
#include <stdint.h>

/* Each returns 1 where some result is NaN (out then unspecified): which NaN an operation passes
   on (its sign and payload) depends on the order of operands in the instructions torch's build
   and this one chose, so such a slice is left to torch. */

/* out = a * ca + b * cb */
int mecha_weighted_sum(int64_t n, const float *restrict a, const float *restrict b, float ca, float cb,
                       float *restrict out) {
    int nan = 0;
    for (int64_t j = 0; j < n; j++) {
        float x = a[j] * ca;
        float y = b[j] * cb;
        float r = x + y;
        out[j] = r;
        nan |= r != r;
    }
    return nan;
}

/* out = (b - c) * alpha + a, or b * alpha + a where c is NULL */
int mecha_add_difference(int64_t n, const float *restrict a, const float *restrict b, const float *restrict c,
                         float alpha, float *restrict out) {
    int nan = 0;
    if (c) {
        for (int64_t j = 0; j < n; j++) {
            float d = b[j] - c[j];
            float x = d * alpha;
            float r = x + a[j];
            out[j] = r;
            nan |= r != r;
        }
    } else {
        for (int64_t j = 0; j < n; j++) {
            float x = b[j] * alpha;
            float r = x + a[j];
            out[j] = r;
            nan |= r != r;
        }
    }
    return nan;
}
"""

_WEIGHTED_SUM_ARGUMENTS = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                           ctypes.c_void_p]
_ADD_DIFFERENCE_ARGUMENTS = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                             ctypes.c_void_p]


def _kernels() -> Any:
    """``(weighted_sum, add_difference)`` compiled, or ``None`` where native kernels are off or
    cannot be built."""
    ws = native.function("mecha_linear", SOURCE, "mecha_weighted_sum", ctypes.c_int, _WEIGHTED_SUM_ARGUMENTS)
    if ws is None:
        return None
    return ws, native.function("mecha_linear", SOURCE, "mecha_add_difference", ctypes.c_int,
                               _ADD_DIFFERENCE_ARGUMENTS)


def available() -> bool:
    """Whether the compiled loops are in use (``native.why_not("mecha_linear")`` says why not)."""
    return _kernels() is not None


def weighted_sum(a: Any, b: Any, alpha: Any) -> torch.Tensor | None:
    """``a * (1 - alpha) + b * alpha`` as the eager expression computes it, or ``None``."""
    if not _number(alpha):
        return None
    kernels, ca, cb = _kernels(), _float32(1 - alpha), _float32(alpha)
    if kernels is None or ca is None or cb is None or not plain_float32(a, b):
        return None
    out = torch.empty_like(a)
    return None if kernels[0](a.numel(), a.data_ptr(), b.data_ptr(), ca, cb, out.data_ptr()) else out


def add_difference(a: Any, b: Any, c: Any, alpha: Any) -> torch.Tensor | None:
    """``(b - c) * alpha + a`` (``b * alpha + a`` without ``c``) as the eager expression computes
    it, or ``None``."""
    if not _number(alpha):
        return None
    kernels, scale = _kernels(), _float32(alpha)
    inputs = (a, b) if c is None else (a, b, c)
    if kernels is None or scale is None or not plain_float32(*inputs):
        return None
    out = torch.empty_like(a)
    nan = kernels[1](a.numel(), a.data_ptr(), b.data_ptr(), None if c is None else c.data_ptr(), scale,
                     out.data_ptr())
    return None if nan else out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float32(value: float) -> float | None:
    """``value`` rounded to float32 (round to nearest even, as torch casts a scalar), or ``None``
    where that is not finite."""
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range
        return None
    return rounded if math.isfinite(rounded) else None
