"""Whole-key statistics of a method (``@merge_method(statistics=...)``) computed over pieces.

A piece is ``(ctx, inputs)``: the method's inputs for a slice of the key (or the whole key).
:class:`~mecha_core.method.Total` is summed in float64, piece by piece in order.
:class:`~mecha_core.method.TopK` is found exactly by a radix selection on the bit patterns of
the magnitudes: the bit pattern of a non-negative float, read as an integer, orders like the
float, so 16 bits at a time a histogram over every piece (``bincount``) says in which bucket the
k-th largest lies; one pass for float16/bfloat16, two for float32, four for float64. A last pass,
when only some of the elements equal to the threshold are selected, finds the flat index of the
last one kept (ties go to the lower index, as a stable descending sort orders them). Memory is
that of one piece plus 65536 counters per request, whatever the key's size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from ..lazy import torch
from ..method import MergeContext, Selection, TopK, Total

Pieces = Callable[[], Iterable[tuple[MergeContext, Sequence[Any]]]]

_INT_OF_SIZE = {2: "int16", 4: "int32", 8: "int64"}
_DIGITS = 1 << 16


def upcast(args: Sequence[Any]) -> list[Any]:
    """Half-precision inputs in float32 (as ``in_float32`` methods compute)."""
    return [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
            for a in args]


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    """The bit patterns of non-negative floats as integers of their size (ordered like the
    floats: the sign bit is 0), flattened."""
    flat = magnitudes.reshape(-1).contiguous()
    return flat.view(getattr(torch, _INT_OF_SIZE[flat.element_size()]))


class _Select:
    """The state of one TopK's radix selection."""

    def __init__(self, request: TopK, numel: int):
        self.request, self.numel = request, numel
        self.k = request.k
        self.prefix = 0  # the digits of the threshold found so far
        self.rank = request.k  # the threshold is the rank-th largest among elements with the prefix
        self.width = 0  # bits per element (known from the first piece)
        self.done = request.k <= 0 or request.k >= numel
        self.ties_kept = 0
        self.ties_total = 0
        self.last_tie = numel
        self.dtype: Any = None

    def histogram(self, ctx: MergeContext, inputs: Sequence[Any], digit: int, hist: torch.Tensor) -> None:
        magnitudes = self.request.of(ctx, *inputs).abs()
        if self.dtype is None:
            self.dtype = magnitudes.dtype
            self.width = 8 * magnitudes.element_size()
        bits = _bits(magnitudes)
        shift = self.width - 16 * (digit + 1)
        if digit > 0:
            bits = bits[(bits >> (shift + 16)) == self.prefix]
        digits = bits >> shift
        if digit > 0:  # the top digit has no higher bits to clear (the sign bit is 0)
            digits = digits & 0xFFFF
        hist += torch.bincount(digits.cpu(), minlength=_DIGITS)

    def choose(self, hist: torch.Tensor, last_digit: bool) -> None:
        """Find the bucket holding the rank-th largest; on the last digit, the threshold."""
        above_each = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # counts above each bucket
        # the bucket d with above[d] < rank <= above[d] + hist[d]
        candidates = torch.nonzero((above_each < self.rank) & (above_each + hist >= self.rank)).reshape(-1)
        d = int(candidates[-1])
        self.rank -= int(above_each[d])
        self.prefix = (self.prefix << 16) | d
        if last_digit:
            self.ties_total = int(hist[d])
            self.ties_kept = self.rank

    def threshold(self) -> float:
        itype = getattr(torch, _INT_OF_SIZE[self.width // 8])
        bits = torch.tensor([self.prefix], dtype=torch.int64).to(itype)
        return float(bits.view(self.dtype)[0])

    def result(self) -> Selection:
        if self.request.k <= 0 or self.request.k >= self.numel or self.dtype is None:
            return Selection(self.request.k, self.numel, None, self.numel)
        return Selection(self.request.k, self.numel, self.threshold(), self.last_tie)


def _check(requests: Sequence[Any]) -> None:
    unknown = [r for r in requests if not isinstance(r, (Total, TopK))]
    if unknown:
        raise TypeError(f"unknown statistic {unknown[0]!r}; use mecha_core.Total or mecha_core.TopK")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"statistics named twice: {sorted({n for n in names if names.count(n) > 1})}")


def compute_whole(requests: Sequence[Total | TopK], ctx: MergeContext, inputs: Sequence[Any]) -> dict[str, Any]:
    """The results of ``requests`` for a key held whole: the same values as :func:`compute`
    (a selection is exact either way), found with one ``kthvalue`` per selection instead of
    passes."""
    _check(requests)
    inputs = upcast(inputs)
    numel = ctx.info.numel
    out: dict[str, Any] = {}
    for r in requests:
        if isinstance(r, Total):
            out[r.name] = float(torch.sum(r.of(ctx, *inputs), dtype=torch.float64))
            continue
        if r.k <= 0 or r.k >= numel:
            out[r.name] = Selection(r.k, numel, None, numel)
            continue
        magnitudes = r.of(ctx, *inputs).abs().reshape(-1)
        # the k-th largest is the (n − k + 1)-th smallest; compared by bit pattern, as the
        # selection over slices does (NaN above every number, -0 and 0 equal after abs)
        bits = _bits(magnitudes)
        kth = torch.kthvalue(bits.cpu(), numel - r.k + 1).values
        threshold = bits.new_tensor([int(kth)]).view(magnitudes.dtype)
        above = int((bits > kth).sum())
        equal = bits == kth
        kept, ties = r.k - above, int(equal.sum())
        last = numel if kept >= ties else int(torch.nonzero(equal).reshape(-1)[kept - 1])
        out[r.name] = Selection(r.k, numel, float(threshold[0]), last)
    return out


def compute(requests: Sequence[Total | TopK], pieces: Pieces, numel: int) -> dict[str, Any]:
    """The results of ``requests`` over every piece ``pieces()`` yields (called once per pass)."""
    _check(requests)
    totals = [r for r in requests if isinstance(r, Total)]
    selects = [_Select(r, numel) for r in requests if isinstance(r, TopK)]
    sums = {r.name: 0.0 for r in totals}
    active = [s for s in selects if not s.done]
    digit = 0
    first = True
    while first or active:
        hists = [torch.zeros(_DIGITS, dtype=torch.int64) for _ in active]
        for ctx, inputs in pieces():
            inputs = upcast(inputs)
            if first:
                for r in totals:
                    sums[r.name] += float(torch.sum(r.of(ctx, *inputs), dtype=torch.float64))
            for s, hist in zip(active, hists):
                s.histogram(ctx, inputs, digit, hist)
        first = False
        still = []
        for s, hist in zip(active, hists):
            last = 16 * (digit + 1) >= s.width
            s.choose(hist, last)
            if not last:
                still.append(s)
        active = still
        digit += 1
    _locate_last_ties([s for s in selects if not s.done and s.ties_kept < s.ties_total], pieces)
    out: dict[str, Any] = dict(sums)
    out.update({s.request.name: s.result() for s in selects})
    return out


def _locate_last_ties(selects: list[_Select], pieces: Pieces) -> None:
    """For selections keeping only some elements equal to the threshold: the flat index of the
    last one kept (the ties_kept-th in flat order)."""
    if not selects:
        return
    seen = [0] * len(selects)
    pending = set(range(len(selects)))
    for ctx, inputs in pieces():
        inputs = upcast(inputs)
        for i in list(pending):
            s = selects[i]
            equal = (_bits(s.request.of(ctx, *inputs).abs()) == s.prefix)
            count = int(equal.sum())
            if seen[i] + count >= s.ties_kept:
                where = torch.nonzero(equal).reshape(-1)
                s.last_tie = ctx.start + int(where[s.ties_kept - seen[i] - 1])
                pending.discard(i)
            seen[i] += count
        if not pending:
            return
