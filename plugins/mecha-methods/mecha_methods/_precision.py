"""Methods with whole-tensor reductions (norms, dot products, sums, ranks, SVD, FFT) compute in
float32 even when the merge's work dtype is float16 or bfloat16.

In half precision a norm product or a sum of squares of an ordinary layer overflows (65504 is
float16's largest value), eps guards such as 1e-8 underflow to 0, and torch's CPU SVD and FFT
refuse half tensors; the results would be silently wrong (a cosine of 0, a zero projection),
NaN, or an error. Element-wise methods need none of this and stay in the work dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from mecha_core.lazy import torch



def _is_half(dtype: Any) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and _is_half(value.dtype):
        return value.float()
    return value


def in_float32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with half-precision tensor inputs upcast to float32; the result is cast back to
    the dtype of the first tensor input (the work dtype)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
        if not _is_half(dtype):
            return fn(*args, **kwargs)
        out = fn(*(_up(a) for a in args), **kwargs)
        return out.to(dtype) if isinstance(out, torch.Tensor) else out

    return wrapper
