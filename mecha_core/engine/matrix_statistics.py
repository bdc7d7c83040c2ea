"""Statistics of a key laid out as a matrix (column sums, :class:`~mecha_core.method.Total` with
``per``; :class:`~mecha_core.method.CrossTotal`) accumulated in float64 over pieces, rows transformed
and kept in place (:class:`~mecha_core.method.RowStack`), and the
:class:`~mecha_core.method.Derived` values computed from them once the passes are done.

A piece is a flat range of the key (``ctx.start`` onward, any shape: only its flat order
counts). A column sum takes pieces that cut rows anywhere (the partial rows at either end are
added to their columns); a cross product and a row stack need pieces of whole rows (a row-wise
method's). Memory: the sums (``width`` or ``width²`` float64), a float64 copy of one piece, and
a row stack's result (allocated once, at the first piece).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..lazy import torch
from ..method import CrossTotal, Derived, MergeContext, RowStack

MATRIX_KINDS = (CrossTotal, RowStack, Derived)


def _check_width(request: CrossTotal, numel: int) -> None:
    if request.width <= 0 or numel % request.width:
        raise ValueError(f"statistic '{request.name}': width {request.width} does not divide the key's "
                         f"{numel} elements")


class MatrixSums:
    """The running sums of the column and cross statistics of one key."""

    def __init__(self, requests: Sequence[Any], numel: int):
        self.crosses = [r for r in requests if isinstance(r, CrossTotal)]
        self.stacks = [r for r in requests if isinstance(r, RowStack)]
        self.derived = [r for r in requests if isinstance(r, Derived)]
        for r in self.crosses:
            _check_width(r, numel)
        self.sums: dict[str, Any] = {r.name: torch.zeros(r.width, r.width, dtype=torch.float64) for r in self.crosses}

    def __bool__(self) -> bool:
        return bool(self.crosses or self.stacks)

    def add(self, ctx: MergeContext, inputs: Sequence[Any]) -> None:
        """Add one piece's contribution to every sum."""
        for r in self.crosses:
            left = r.left(ctx, *inputs).reshape(-1)
            if ctx.start % r.width or left.numel() % r.width:
                raise ValueError(f"statistic '{r.name}': a piece of the key does not hold whole rows of "
                                 f"{r.width} (declare the method rowwise=True)")
            left64 = left.to(device="cpu", dtype=torch.float64).reshape(-1, r.width)
            right64 = r.right(ctx, *inputs).reshape(-1).to(device="cpu", dtype=torch.float64).reshape(-1, r.width)
            self.sums[r.name].addmm_(left64.T, right64)
        for r in self.stacks:
            _stack_rows(self.sums, r, ctx, inputs)

    def finish(self, found: dict[str, Any]) -> dict[str, Any]:
        """``found`` with the sums and then every derived value added (in request order). The
        sums are handed over, not kept: a derived value that pops one from ``found`` frees it
        (a d×d float64 cross product, a row stack) before it computes from it."""
        found.update(self.sums)
        self.sums = {}
        for r in self.derived:
            found[r.name] = r.of(found)
        return found


def add_columns(sums: torch.Tensor, values: torch.Tensor, start: int) -> None:
    """Add a flat run of values starting at flat index ``start`` to the column sums."""
    width = sums.numel()
    values = values.to(device="cpu")
    offset = start % width
    if offset:  # the end of a row begun in an earlier piece
        head = min(width - offset, values.numel())
        sums[offset:offset + head] += values[:head].to(torch.float64)
        values = values[head:]
    whole = values.numel() - values.numel() % width
    if whole:
        sums += values[:whole].reshape(-1, width).sum(dim=0, dtype=torch.float64)
    if whole < values.numel():  # the start of a row a later piece ends
        rest = values[whole:]
        sums[:rest.numel()] += rest.to(torch.float64)


def _stack_rows(found: dict[str, Any], request: RowStack, ctx: MergeContext, inputs: Sequence[Any]) -> None:
    """Put a piece's transformed rows in place in the request's result (made at the first piece)."""
    shape = tuple(ctx.info.shape)
    rows = shape[0] if len(shape) >= 2 else 1
    row = ctx.info.numel // rows if rows else 0
    n = inputs[0].numel() if inputs and hasattr(inputs[0], "numel") else 0
    if row == 0 or ctx.start % row or n % row:
        raise ValueError(f"statistic '{request.name}': a piece of the key does not hold whole rows "
                         "(declare the method rowwise=True)")
    value = request.of(ctx, *inputs)
    first = ctx.start // row
    if value.shape[0] != n // row:
        raise ValueError(f"statistic '{request.name}': of() gave {value.shape[0]} rows for a piece of {n // row}")
    if request.name not in found:
        found[request.name] = torch.empty((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
    found[request.name][first:first + value.shape[0]] = value
