"""The sums a diff accumulates per (pair, group), and the measures made from them.

Each unit of work (a key, or a slice of one) gives, for every pair of models holding it, the
float64 sums below; sums of one group are added in a fixed order (key order, then slice order),
so the result does not depend on the thread count. The measures are then closed forms of the
sums (:func:`measures`).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..lazy import torch

from .result import Measures

#: The fields of a sums list, in order. ``max`` combines by max, every other one by addition.
FIELDS = ("keys", "elements", "xx", "yy", "xy", "dd", "max", "uu", "vv", "uv", "signed", "agree")
_MAX = FIELDS.index("max")


def zero() -> list[float]:
    return [0.0] * len(FIELDS)


def add(total: list[float], part: Sequence[float]) -> None:
    """Add ``part`` into ``total`` in place."""
    for i, value in enumerate(part):
        total[i] = max(total[i], value) if i == _MAX else total[i] + value


def unit_sums(rows: torch.Tensor, pairs: Sequence[tuple[int, int]], base: torch.Tensor | None,
              first_slice: bool) -> list[list[float]]:
    """The sums of each pair (row indices into ``rows``) over one slice.

    ``rows``: one float64 row per model, the slice's elements; ``base``: the base's elements
    (float64), or ``None``. ``first_slice``: count the key once in ``keys``.
    """
    gram = rows @ rows.T  # every <x_i, x_j> in one pass
    task_gram = signs = None
    if base is not None:
        tasks = rows - base  # explicit differences: a task vector of exactly zero stays zero
        task_gram = tasks @ tasks.T
        signs = torch.sign(tasks).to(torch.int8)
        del tasks
    out = []
    for i, j in pairs:
        change = rows[j] - rows[i]
        low, high = torch.aminmax(change) if change.numel() else (torch.zeros(()), torch.zeros(()))
        sums = zero()
        sums[0] = 1.0 if first_slice else 0.0
        sums[1] = float(rows.shape[1])
        sums[2], sums[3], sums[4] = float(gram[i, i]), float(gram[j, j]), float(gram[i, j])
        sums[5] = float(change @ change)
        sums[6] = max(-float(low), float(high))
        if task_gram is not None and signs is not None:
            sums[7], sums[8], sums[9] = float(task_gram[i, i]), float(task_gram[j, j]), float(task_gram[i, j])
            product = signs[i] * signs[j]
            sums[10] = float(product.count_nonzero())
            sums[11] = float((product > 0).sum())
        out.append(sums)
    return out


def _cosine(dot: float, a: float, b: float) -> float | None:
    if a <= 0.0 or b <= 0.0:
        return None
    value = dot / math.sqrt(a * b)
    return value if math.isnan(value) else max(-1.0, min(1.0, value))  # rounding may step past +-1


def measures(sums: Sequence[float], with_base: bool) -> Measures:
    """The measures of one group from its accumulated sums."""
    keys, elements, xx, yy, xy, dd, largest, uu, vv, uv, signed, agree = sums
    if elements == 0:
        return Measures(keys=int(keys), elements=0, cosine=None, relative_l2=None, max_abs_change=None)
    if xx > 0.0:
        relative: float | None = math.sqrt(dd / xx)
    else:
        relative = 0.0 if dd == 0.0 else None
    return Measures(
        keys=int(keys), elements=int(elements), cosine=_cosine(xy, xx, yy), relative_l2=relative,
        max_abs_change=largest,
        task_cosine=_cosine(uv, uu, vv) if with_base else None,
        sign_agreement=(agree / signed if signed else None) if with_base else None,
    )
