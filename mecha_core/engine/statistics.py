"""Whole-key statistics of a method (``@merge_method(statistics=...)``) computed over pieces.

A piece is ``(ctx, inputs)``: the method's inputs for a slice of the key (or the whole key).
:class:`~mecha_core.method.Total` is summed in float64, piece by piece in order.
:class:`~mecha_core.method.TopK` is found exactly on the bit patterns of the magnitudes: the bit
pattern of a non-negative float, read as an integer, orders like the float. The first pass
counts the top 16 bits of every element (``bincount``: sign, exponent and the first mantissa
bits of a float32), which says in which bucket the k-th largest lies; for float16/bfloat16 that
is the threshold itself. For wider floats a second pass collects the few elements of that
bucket (their bit patterns and flat indices: a fraction of a percent of a smooth tensor), and
the threshold and the last tied element kept are read off them; a bucket too large to collect
(more elements than one slice) is narrowed instead by further 16-bit digits, one pass each, as
a radix selection does. When only some of the elements equal to the threshold are selected,
the flat index of the last one kept is found too (ties go to the lower index, as a stable
descending sort orders them). Memory is one piece plus 65536 counters per request, and at most
one slice's worth of collected candidates, whatever the key's size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from ..lazy import torch
from ..method import MergeContext, Selection, TopK, Total
from .matrix_statistics import MATRIX_KINDS, MatrixSums

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
    """The state of one TopK's selection."""

    def __init__(self, request: TopK, numel: int):
        self.request, self.numel = request, numel
        self.k = request.k
        self.prefix = 0  # the digits of the threshold found so far (all of it once found)
        self.rank = request.k  # the threshold is the rank-th largest among elements with the prefix
        self.width = 0  # bits per element (known from the first piece)
        self.done = request.k <= 0 or request.k >= numel
        self.found = self.done  # the threshold is known (ties_kept/ties_total too)
        self.ties_kept = 0
        self.ties_total = 0
        self.last_tie = numel
        self.bucket = 0  # elements in the bucket of the prefix found so far
        self.dtype: Any = None
        # the bucket's bit patterns and flat indices, in flat order; allocated once at the
        # bucket's size (known from the histogram): small tensors kept between a pass's large
        # temporaries would fragment the heap and grow the process by hundreds of MB
        self.found_bits: torch.Tensor | None = None
        self.found_where: torch.Tensor | None = None
        self.filled = 0

    def magnitude_bits(self, ctx: MergeContext, inputs: Sequence[Any]) -> torch.Tensor:
        magnitudes = self.request.of(ctx, *inputs).abs()
        if self.dtype is None:
            self.dtype = magnitudes.dtype
            self.width = 8 * magnitudes.element_size()
        return _bits(magnitudes)

    def histogram(self, bits: torch.Tensor, digit: int, hist: torch.Tensor) -> None:
        shift = self.width - 16 * (digit + 1)
        if digit > 0:
            bits = bits[(bits >> (shift + 16)) == self.prefix]
        digits = bits >> shift
        if digit > 0:  # the top digit has no higher bits to clear (the sign bit is 0)
            digits = digits & 0xFFFF
        hist += torch.bincount(digits.cpu(), minlength=_DIGITS)

    def collect(self, ctx: MergeContext, bits: torch.Tensor) -> None:
        """Keep the bit patterns and flat indices of the piece's elements in the prefix's bucket."""
        if self.found_bits is None:
            self.found_bits = torch.empty(self.bucket, dtype=bits.dtype)
            self.found_where = torch.empty(self.bucket, dtype=torch.int64)
        assert self.found_where is not None
        where = torch.nonzero((bits >> (self.width - 16)) == self.prefix).reshape(-1)
        count = where.numel()
        if count:
            self.found_bits[self.filled:self.filled + count] = bits[where].cpu()
            self.found_where[self.filled:self.filled + count] = where.cpu() + ctx.start
            self.filled += count

    def choose(self, hist: torch.Tensor, last_digit: bool) -> None:
        """Find the bucket holding the rank-th largest; on the last digit, the threshold."""
        above_each = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # counts above each bucket
        # the bucket d with above[d] < rank <= above[d] + hist[d]
        candidates = torch.nonzero((above_each < self.rank) & (above_each + hist >= self.rank)).reshape(-1)
        d = int(candidates[-1])
        self.rank -= int(above_each[d])
        self.prefix = (self.prefix << 16) | d
        self.bucket = int(hist[d])
        if last_digit:
            self.ties_total = int(hist[d])
            self.ties_kept = self.rank
            self.found = True

    def settle(self) -> None:
        """The threshold and the last tie kept, from the collected bucket (in flat order)."""
        assert self.found_bits is not None and self.found_where is not None and self.filled == self.bucket
        bits, where = self.found_bits, self.found_where
        self.found_bits = self.found_where = None
        threshold = torch.sort(bits, descending=True).values[self.rank - 1]
        above = int((bits > threshold).sum())
        equal = bits == threshold
        self.prefix = int(threshold)
        self.ties_total = int(equal.sum())
        self.ties_kept = self.rank - above
        if self.ties_kept < self.ties_total:
            self.last_tie = int(where[equal][self.ties_kept - 1])
        self.found = True

    def threshold(self) -> float:
        itype = getattr(torch, _INT_OF_SIZE[self.width // 8])
        bits = torch.tensor([self.prefix], dtype=torch.int64).to(itype)
        return float(bits.view(self.dtype)[0])

    def result(self) -> Selection:
        if self.request.k <= 0 or self.request.k >= self.numel or self.dtype is None:
            return Selection(self.request.k, self.numel, None, self.numel)
        return Selection(self.request.k, self.numel, self.threshold(), self.last_tie)


def _check(requests: Sequence[Any]) -> None:
    unknown = [r for r in requests if not isinstance(r, (Total, TopK, *MATRIX_KINDS))]
    if unknown:
        raise TypeError(f"unknown statistic {unknown[0]!r}; use mecha_core.Total, TopK, ColumnTotal, CrossTotal "
                        "or Derived")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"statistics named twice: {sorted({n for n in names if names.count(n) > 1})}")


def compute_whole(requests: Sequence[Total | TopK], ctx: MergeContext, inputs: Sequence[Any]) -> dict[str, Any]:
    """The results of ``requests`` for a key held whole: the same values as :func:`compute`
    over slices (a selection is exact either way), the key being one piece."""
    inputs = upcast(inputs)
    return compute(requests, lambda: [(ctx, inputs)], ctx.info.numel, ctx.info.numel)


def compute(requests: Sequence[Total | TopK], pieces: Pieces, numel: int,
            collect_limit: int | None = None) -> dict[str, Any]:
    """The results of ``requests`` over every piece ``pieces()`` yields (called once per pass).

    ``collect_limit``: how many candidate elements the selections may collect in all (their
    bit patterns and indices, 12 to 16 bytes each); default: the largest piece's size."""
    _check(requests)
    totals = [r for r in requests if isinstance(r, Total)]
    selects = [_Select(r, numel) for r in requests if isinstance(r, TopK)]
    sums = {r.name: 0.0 for r in totals}
    matrices = MatrixSums(requests, numel)
    largest = 0
    # pass 1: the sums, and the top 16 bits of every selection's magnitudes
    active = [s for s in selects if not s.done]
    hists = [torch.zeros(_DIGITS, dtype=torch.int64) for _ in active]
    for ctx, inputs in pieces():
        inputs = upcast(inputs)
        for r in totals:
            sums[r.name] += float(torch.sum(r.of(ctx, *inputs), dtype=torch.float64))
        if matrices:
            matrices.add(ctx, inputs)
        for s, hist in zip(active, hists):
            bits = s.magnitude_bits(ctx, inputs)
            largest = max(largest, bits.numel())
            s.histogram(bits, 0, hist)
    for s, hist in zip(active, hists):
        s.choose(hist, s.width <= 16)
    # pass 2: collect the buckets that fit; narrow the others digit by digit
    room = largest if collect_limit is None else collect_limit
    collecting, narrowing = [], []
    for s in (s for s in active if not s.found):
        if s.bucket <= room:
            room -= s.bucket
            collecting.append(s)
        else:
            narrowing.append(s)
    digit = 1
    while collecting or narrowing:
        hists = [torch.zeros(_DIGITS, dtype=torch.int64) for _ in narrowing]
        for ctx, inputs in pieces():
            inputs = upcast(inputs)
            for s in collecting:
                s.collect(ctx, s.magnitude_bits(ctx, inputs))
            for s, hist in zip(narrowing, hists):
                s.histogram(s.magnitude_bits(ctx, inputs), digit, hist)
        for s in collecting:
            s.settle()
        collecting = []
        still = []
        for s, hist in zip(narrowing, hists):
            last = 16 * (digit + 1) >= s.width
            s.choose(hist, last)
            if not last:
                still.append(s)
        narrowing = still
        digit += 1
    _locate_last_ties([s for s in selects if not s.done and s.last_tie >= numel and s.ties_kept < s.ties_total],
                      pieces)
    out: dict[str, Any] = dict(sums)
    out.update({s.request.name: s.result() for s in selects})
    return matrices.finish(out)


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
