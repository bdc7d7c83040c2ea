"""What sd-mecha's whole-key methods hold besides their inputs and result (``working_set=``), so
the engine admits their keys within the memory budget (alone when one needs all of it).

These methods keep sd-mecha's definitions, which take the whole tensor at once (a k-th value,
an argsort, an FFT, an SVD, stacked deltas), and so are not sliced. The counts are float32
copies of the key (int64 indices and masks count double), measured on an 8M-element key with
three inputs and rounded up (``PeakPrivateMemory`` around one call, with glibc's mmap
threshold fixed so that every temporary is counted; 2026-12-02): perpendicular_component 1.9
copies, model_stock 3.0, ties_sum_extended 13.0, ties_sum_with_dropout 16.0 (della_eps or
not), dropout 6.7, crossover 4.4 (a matrix), top_k_tensor_sum 10.0, rotate 4.6 with its
1024×1024 matrices (5.7 for a fractional alignment). tests/test_working_sets.py measures them
again.
"""

from __future__ import annotations

from typing import Any, Callable


def copies(fixed: float, per_input: float = 0.0, *, per_dim: float = 0.0) -> Callable[..., int]:
    """A ``working_set`` of ``fixed + per_input·inputs`` float32 copies of the key (``per_dim``
    more per dimension of the key: a filter's meshgrid)."""

    def working_set(info: Any, inputs: int, itemsize: int, **_: Any) -> int:
        count = fixed + per_input * inputs + per_dim * len(tuple(info.shape))
        return int(count * info.numel * max(itemsize, 4))

    return working_set


def rotate_working_set(info: Any, inputs: int, itemsize: int, **hyper: Any) -> int:
    """sdmecha_rotate: three float32 copies of the matrix (the centred rows, the rotated ones)
    and its d×d matrices (aᵀ·b, the SVD's factors, Q: about 16·d² bytes; a fractional
    alignment's complex eigendecomposition about as much again)."""
    shape = tuple(info.shape)
    if len(shape) < 2:
        return 0
    kernel = 1
    for d in shape[2:]:
        kernel *= d
    width = kernel if len(shape) == 4 and kernel != 1 else info.numel // shape[0]
    alignment = float(hyper.get("alignment", 1.0))
    per_d2 = 16 * (2 if alignment != round(alignment) else 1)
    return 3 * info.numel * max(itemsize, 4) + per_d2 * width * width
