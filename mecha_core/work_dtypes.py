"""Which dtypes merge methods can compute in, per device: a work dtype torch cannot do arithmetic
in (float8 on the CPU: no addition, no multiplication) would otherwise fail deep inside torch,
after the merge has started."""

from __future__ import annotations

from .errors import MechaError

#: device type -> the work dtypes offered there. float8 is a storage format on both (cuda does
#: float8 arithmetic only in scaled matrix products, not in the element-wise ops methods use);
#: it stays a valid *output* dtype.
WORK_DTYPES: dict[str, tuple[str, ...]] = {
    "cpu": ("float32", "float64", "float16", "bfloat16"),
    "cuda": ("float32", "float64", "float16", "bfloat16"),
}


def check_work_dtype(name: str, device: str) -> None:
    """Refuse a work dtype that does not compute on ``device`` (``cpu``, ``cuda`` or ``cuda:N``),
    in one line listing the valid ones."""
    kind = device.split(":", 1)[0]
    valid = WORK_DTYPES.get(kind, WORK_DTYPES["cpu"])
    if name not in valid:
        raise MechaError(f"--work-dtype {name}: methods cannot compute in it on {kind}; "
                         f"use one of {', '.join(valid)}")
