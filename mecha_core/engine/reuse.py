"""Evaluating units into per-worker buffers: inputs converted to the work dtype without a fresh
allocation each time.

Every slice of an element-wise key converts each input to the work dtype (float16 -> float32)
into a new tensor. The local writer's evaluator converts them into its thread's buffers instead
(:class:`~mecha_core.engine.allocator.WorkerBuffers`), one slot per conversion of a unit, reused
by the thread's next unit: the memory is already mapped, nothing is allocated or faulted in. The
values are the same (``copy_`` converts as ``to`` does); only where they live changes. A unit's
buffers are overwritten by the thread's next unit only, after the unit's bytes are written, so
this evaluator is for the writer that writes each unit before it takes the next; statistics
passes (which may keep what a pass gave them) convert as before.
"""

from __future__ import annotations

import threading
from typing import Any

from ..lazy import torch
from .allocator import WorkerBuffers
from .evaluate import Evaluator
from .plan import Plan


class ReusingEvaluator(Evaluator):
    """An :class:`Evaluator` whose ``evaluate`` converts inputs into per-thread buffers."""

    def __init__(self, plan: Plan, buffers: WorkerBuffers):
        super().__init__(plan)
        self.buffers = buffers
        self._state = threading.local()

    def evaluate(self, key: str, start: int = 0, stop: int | None = None,
                 stats: dict[int, dict[str, Any]] | None = None) -> torch.Tensor:
        state = self._state
        state.slot, state.on = 0, True  # each conversion of this unit gets a slot of its own
        try:
            return super().evaluate(key, start, stop, stats)
        finally:
            state.on = False

    def _work(self, value: Any) -> Any:
        state = self._state
        if (not getattr(state, "on", False) or not isinstance(value, torch.Tensor)
                or not value.is_floating_point() or value.dtype == self.work_dtype
                or value.device.type != "cpu" or not value.is_contiguous()):
            return super()._work(value)
        slot = state.slot
        state.slot += 1
        buf = self.buffers.tensor(("work", slot), tuple(value.shape), self.work_dtype)
        if buf is None:
            return super()._work(value)
        return buf.copy_(value)
