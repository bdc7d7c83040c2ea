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

Float32 magnitudes over several pieces usually need one pass only: the first pieces' histogram
(at least :data:`_ESTIMATE` elements) estimates the k-th's bucket, and every piece then counts its
elements by their whole bit pattern within a window of :data:`WINDOW` top-16-bit buckets around
it (all below the window in one counter, all above in another), into one int32 histogram. The
:data:`BAND` bins of the window around the estimated k-th are recorded (their non-zero bins)
and cleared every :data:`_FLUSH` elements (one piece, or a run of smaller ones); the records
hold at most as many entries as the candidates the collection would. When the k-th lies in the
window, the counts give the exact threshold, and when it lies in the band the records say which
run of pieces holds the last tie kept: only those pieces are evaluated again, or, for a caller
that evaluates the pieces in order next (the engine's merge pass), counted as it passes them
(:class:`TieSearch`); elsewhere the pieces are walked up to it. Otherwise (a key whose first
pieces are not like the rest) the passes above run. A key that is one piece is collected from
the bit patterns at hand, without a second pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from ..lazy import torch
from ..method import MergeContext, Selection, Then, TopK, Total
from . import kernels
from .matrix_statistics import MATRIX_KINDS, MatrixSums, add_columns

Pieces = Callable[[], Iterable[tuple[MergeContext, Sequence[Any]]]]
#: ``piece(i)``: the ``i``-th piece that ``pieces()`` yields, evaluated alone
Piece = Callable[[int], tuple[MergeContext, Sequence[Any]]]

_INT_OF_SIZE = {2: "int16", 4: "int32", 8: "int64"}
_DIGITS = 1 << 16
#: top-16-bit buckets counted at full resolution in the one-pass selection of float32 magnitudes
WINDOW = 4
#: bins of that window, around the estimate of the k-th, whose counts are recorded per run of
#: pieces: about three standard errors of a 512K-element sample's estimate of the 80th
#: percentile of a smooth key's magnitudes, either way
BAND = 3 << 15


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
        self.window: _Window | None = None  # the one-pass selection's counts (float32, many pieces)
        # the first pieces' bit patterns, kept until they are enough to place the window
        self.sample: list[tuple[int, torch.Tensor]] | None = None
        self.sampled = 0
        # the pieces (first, last) holding the last tie kept, when counted
        self.tie_pieces: tuple[int, int] | None = None
        self.tie_rank = 0  # ... and how many of their ties are kept (the last one included)

    def magnitude_bits(self, ctx: MergeContext, inputs: Sequence[Any]) -> torch.Tensor:
        """The bit patterns of the piece's magnitudes, flat (a tensor of this call's own)."""
        values = self.request.of(ctx, *inputs)
        shared = any(isinstance(a, torch.Tensor) and _same_memory(a, values) for a in inputs)
        magnitudes = values.abs() if shared or not values.is_contiguous() else values.abs_()
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

    def collect_all(self, ctx: MergeContext, bits: torch.Tensor) -> None:
        """Keep every element of a key that is one piece (:meth:`settle` then sorts them)."""
        self.found_bits = bits
        self.found_where = torch.arange(ctx.start, ctx.start + bits.numel(), dtype=torch.int64)
        self.filled = bits.numel()

    def choose(self, hist: torch.Tensor, last_digit: bool) -> None:
        """Find the bucket holding the rank-th largest; on the last digit, the threshold."""
        d, above = _bucket_of_rank(hist, self.rank)
        self.rank -= above
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

    def pass_ties(self, ctx: MergeContext, bits: torch.Tensor, left: int) -> int:
        """How many of a piece's elements (their magnitudes' bit patterns ``bits``, in flat
        order) equal the threshold; when they reach ``left``, the ``left``-th of them is the last
        tie kept, and ``last_tie`` is set to its flat index."""
        equal = bits == self.prefix
        count = int(torch.count_nonzero(equal))  # a quarter of the time of summing the booleans
        if count >= left:
            self.last_tie = ctx.start + int(torch.nonzero(equal).reshape(-1)[left - 1])
        return count

    def result(self) -> Selection:
        if self.request.k <= 0 or self.request.k >= self.numel or self.dtype is None:
            return Selection(self.request.k, self.numel, None, self.numel)
        return Selection(self.request.k, self.numel, self.threshold(), self.last_tie)


def _bucket_of_rank(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket ``d`` holding the ``rank``-th largest element (1-based) of a histogram of
    non-negative counts over ascending buckets, and the count of elements above it: the
    cumulative counts from the top reach ``rank`` first there (one ``cumsum`` and a binary search
    instead of comparisons over every bucket). ``rank`` is at most the histogram's total."""
    from_top = torch.cumsum(torch.flip(hist, [0]), 0)
    j = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype)))
    d = hist.numel() - 1 - j
    return d, int(from_top[j]) - int(hist[d])


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Window:
    """A float32 selection in one pass: every element's bit pattern counted at full resolution
    within :data:`WINDOW` top-16-bit buckets around an estimate of the k-th's bucket (from the
    first pieces), the rest as below or above, in one int32 histogram (``index_add_`` of ones:
    no allocation, no min/max passes as ``bincount`` makes). Within the window, the :data:`BAND`
    bins around the estimate of the k-th itself are also recorded: every :data:`_FLUSH`
    elements (one piece, or a run of smaller ones) their non-zero counts are kept for those
    pieces (up to ``room`` records in all, each 8 bytes) and cleared, to find the pieces that hold
    the last tie kept. A k-th outside the band (or records that overflow) leaves that to a walk
    over the pieces. Recording the band alone, not the whole window, costs a quarter of the
    search for non-zero bins each record takes."""

    def __init__(self, select: _Select, sample: torch.Tensor, room: int, ones: torch.Tensor):
        self.select, self.room, self.ones = select, room, ones
        hist = torch.bincount(sample >> 16, minlength=_DIGITS)
        piece_rank = max(1, min(sample.numel(), round(select.k * sample.numel() / select.numel)))
        d, above = _bucket_of_rank(hist, piece_rank)
        # the window reaches further to the side the estimate lies nearer to
        upper_half = (piece_rank - above) * 2 <= int(hist[d])
        low = d - (WINDOW // 2 - 1 if upper_half else WINDOW // 2)
        low = max(0, min(low, (1 << 15) - WINDOW))
        self.offset = (low << 16) - 1  # bits - offset: 1 for the window's first bit pattern
        self.size = WINDOW << 16
        # the band: centred where the k-th would be if bucket d's elements were spread evenly
        # (its rank among them, from the top), within the window
        within = (piece_rank - above - 0.5) / max(1, int(hist[d]))
        estimate = ((d - low) << 16) + int((1 - within) * (1 << 16))
        self.band_lo = max(0, min(estimate - BAND // 2, self.size - BAND))
        self.band_hi = self.band_lo + BAND
        # below, the window, above: summed over the pieces, but for the band while it is recorded
        self.hist = torch.zeros(self.size + 2, dtype=torch.int32)
        self.counted = 0  # elements in hist (int32 counts: spilled into int64 before 2**31)
        self.spilled: torch.Tensor | None = None
        self.pending: tuple[int, int] | None = None  # the first and last piece since the last record
        self.pending_elements = 0
        # the non-zero band counts (bin in the window, count) of each run of pieces, in two buffers
        # allocated once: small tensors kept between a pass's large temporaries would fragment the heap
        self.record_bins = torch.empty(room, dtype=torch.int32)
        self.record_counts = torch.empty(room, dtype=torch.int32)
        self.records: list[tuple[int, int, int, int]] | None = []  # first piece, last, first entry, end
        self.recorded = 0

    def count(self, index: int, bits: torch.Tensor) -> None:
        """Count piece ``index``'s bit patterns (``bits`` is overwritten); pieces come in order."""
        n = bits.numel()
        if self.counted + n >= _INT32_COUNTS:
            self.flush()
            self.spilled = self.hist.long() if self.spilled is None else self.spilled + self.hist
            self.hist.zero_()
            self.counted = 0
        if not kernels.window_count(bits, self.offset, self.size, self.hist):
            if self.offset < 0:  # bits + 1 would overflow for the one NaN pattern 0x7FFFFFFF
                bits.clamp_(max=0x7FFFFFFE)
            bins = bits.sub_(self.offset).clamp_(0, self.size + 1)
            if self.ones.numel() < n:
                self.ones = torch.ones(n, dtype=torch.int32)
            self.hist.index_add_(0, bins, self.ones[:n])
        self.counted += n
        self.pending = (index if self.pending is None else self.pending[0], index)
        self.pending_elements += n
        if self.pending_elements >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        """Record the band's counts of the pieces since the last record, and clear them."""
        if self.pending is None:
            return
        first_piece, last_piece = self.pending
        self.pending, self.pending_elements = None, 0
        if self.records is None:
            return
        band = self.hist[1 + self.band_lo:1 + self.band_hi]
        # the band's few non-zero bins (a hundred or so a piece): torch's scalar search over its
        # bins took less than summing groups of bins first and searching the occupied ones
        where = torch.nonzero(band).reshape(-1).to(torch.int32)
        first, end = self.recorded, self.recorded + where.numel()
        if end > self.room:  # too many distinct values: the counts stay in hist, the tie is found by a walk
            self.hist[1:self.size + 1].index_add_(0, self.record_bins[:first], self.record_counts[:first])
            self.records = None
            self.record_bins = self.record_counts = torch.empty(0, dtype=torch.int32)
            return
        if end > first:
            self.record_bins[first:end] = where + self.band_lo
            self.record_counts[first:end] = band[where]
            self.records.append((first_piece, last_piece, first, end))
            self.recorded = end
        band.zero_()

    def _counts(self) -> torch.Tensor:
        """Every count (below, the window's bins, above) summed, int64."""
        counts = self.hist.long()
        if self.spilled is not None:
            counts += self.spilled
        if self.records is not None:
            n = self.recorded
            counts[1:self.size + 1].index_add_(0, self.record_bins[:n], self.record_counts[:n].long())
        return counts

    def resolve(self) -> bool:
        """Settle the selection from the counts; ``False`` when the k-th is outside the window."""
        self.flush()
        s = self.select
        counts = self._counts()
        above, inside = int(counts[-1]), counts[1:self.size + 1]
        if above >= s.k or above + int(inside.sum()) < s.k:
            return False
        b, above_b = _bucket_of_rank(inside, s.k - above)
        s.prefix = self.offset + 1 + b
        s.ties_total = int(inside[b])
        s.ties_kept = s.k - above - above_b
        s.found = True
        if s.ties_kept < s.ties_total and self.records is not None and self.band_lo <= b < self.band_hi:
            seen = 0
            for first_piece, last_piece, first, end in self.records:
                where = self.record_bins[first:end]
                at = int(torch.searchsorted(where, b))
                here = int(self.record_counts[first + at]) if at < where.numel() and int(where[at]) == b else 0
                if seen + here >= s.ties_kept:
                    s.tie_pieces, s.tie_rank = (first_piece, last_piece), s.ties_kept - seen
                    break
                seen += here
        return True


#: elements counted into a window's histogram before its non-zero bins are recorded: a piece
#: this large is recorded alone, smaller ones in runs
_FLUSH = WINDOW << 16
#: elements a window's int32 histogram counts before its counts are spilled into int64 ones
_INT32_COUNTS = 1 << 31
#: keys of at most this many elements are selected by sorting their bit patterns: a histogram's
#: 65536 counters (zeroed, summed, searched) cost more than sorting so few (SD1 has ~700 such keys)
_SORTED = 1 << 14
#: elements of the first pieces a window is placed from (at least)
_ESTIMATE = 1 << 19


def _check(requests: Sequence[Any]) -> None:
    unknown = [r for r in requests if not isinstance(r, (Total, TopK, Then, *MATRIX_KINDS))]
    if unknown:
        raise TypeError(f"unknown statistic {unknown[0]!r}; use mecha_core.Total, TopK, Then, CrossTotal, "
                        "RowStack or Derived")
    names = [r.name for r in requests if not isinstance(r, Then)]
    if len(set(names)) != len(names):
        raise ValueError(f"statistics named twice: {sorted({n for n in names if names.count(n) > 1})}")


def compute_whole(requests: Sequence[Total | TopK], ctx: MergeContext, inputs: Sequence[Any]) -> dict[str, Any]:
    """The results of ``requests`` for a key held whole: the same values as :func:`compute`
    over slices (a selection is exact either way), the key being one piece."""
    inputs = upcast(inputs)
    return compute(requests, lambda: [(ctx, inputs)], ctx.info.numel, ctx.info.numel)


def compute(requests: Sequence[Total | TopK | Then], pieces: Pieces, numel: int,
            collect_limit: int | None = None, known: dict[str, Any] | None = None,
            piece: Piece | None = None, ranges: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The results of ``requests`` over every piece ``pieces()`` yields (called once per pass).

    ``collect_limit``: how many candidate elements the selections may collect in all (their
    bit patterns and indices, 12 to 16 bytes each); default: the largest piece's size.
    A :class:`Then` is resolved after the requests before it, in further passes, given every
    result so far (``known``: those of earlier stages).
    ``piece``: evaluates one piece alone (the one holding a selection's last tie); without it
    the pieces are walked up to that one.
    ``ranges``: the pieces' element bounds, given by a caller that goes on to evaluate the pieces
    in order: a selection of the last stage whose last tie kept lies in a run of recorded pieces
    is then a :class:`TieSearch`, which finds it as that caller passes the run (``piece`` is
    required with it)."""
    _check(requests)
    if not requests:  # nothing to pass over the key for
        return {}
    staged = next((i for i, r in enumerate(requests) if isinstance(r, Then)), None)
    if staged is not None:  # the requests before the first Then, then what it asks for given them
        out = compute(requests[:staged], pieces, numel, collect_limit, piece=piece)
        so_far = {**(known or {}), **out}
        later = [*requests[staged].then(dict(so_far)), *requests[staged + 1:]]
        out.update(compute(later, pieces, numel, collect_limit, so_far, piece=piece, ranges=ranges))
        return out
    totals = [r for r in requests if isinstance(r, Total)]
    selects = [_Select(r, numel) for r in requests if isinstance(r, TopK)]
    sums: dict[str, Any] = {r.name: torch.zeros(r.per, dtype=torch.float64) if r.per else 0.0 for r in totals}
    matrices = MatrixSums(requests, numel)
    largest = 0
    active = [s for s in selects if not s.done]
    hists: dict[int, torch.Tensor] = {}  # the top-16-bit histograms of the selections in passes
    later: list[_Select] = []  # selections whose bucket is chosen, to be collected or narrowed
    room = collect_limit
    ones: torch.Tensor | None = None
    # pass 1: the sums; each selection's window counts, or the whole piece's selection, or the
    # top 16 bits of every magnitude
    for index, (ctx, inputs) in enumerate(pieces()):
        inputs = upcast(inputs)
        for r in totals:
            if r.per:
                add_columns(sums[r.name], r.of(ctx, *inputs).reshape(-1), ctx.start)
            else:
                sums[r.name] += float(torch.sum(r.of(ctx, *inputs), dtype=torch.float64))
        if matrices:
            matrices.add(ctx, inputs)
        for s in active:
            bits = s.magnitude_bits(ctx, inputs)
            largest = max(largest, bits.numel())
            if index == 0:
                if room is None:
                    room = bits.numel()
                if bits.numel() >= numel and numel <= _SORTED:  # a small key: every element is a candidate
                    s.bucket = numel
                    s.collect_all(ctx, bits)
                    s.settle()
                    continue
                if bits.numel() >= numel:  # the key is one piece: select from the bits at hand
                    hist = torch.bincount(bits >> (s.width - 16), minlength=_DIGITS)
                    s.choose(hist, s.width <= 16)
                    if not s.found and s.bucket <= room:
                        room -= s.bucket
                        s.collect(ctx, bits)
                        s.settle()
                    elif not s.found:
                        later.append(s)
                    continue
                if s.width == 32 and numel >= WINDOW << 16:  # keys that outweigh the window's bins
                    s.sample = []
                else:
                    hists[id(s)] = torch.zeros(_DIGITS, dtype=torch.int64)
            if s.sample is not None:  # the window is placed once the first pieces say where
                s.sample.append((index, bits))
                s.sampled += bits.numel()
                if s.sampled >= min(_ESTIMATE, numel):
                    ones = _place_window(s, max(1, room // max(1, len(active))), ones)
            elif s.window is not None:
                s.window.count(index, bits)
            elif id(s) in hists:
                s.histogram(bits, 0, hists[id(s)])
    if room is None:
        room = largest
    missed = []
    for s in active:
        if s.sample is not None:  # fewer elements than the estimate takes (pieces of odd sizes)
            ones = _place_window(s, max(1, room // max(1, len(active))), ones)
        if s.window is not None:
            if not s.window.resolve():
                missed.append(s)
            s.window = None
        elif id(s) in hists:
            s.choose(hists.pop(id(s)), s.width <= 16)
            if not s.found:
                later.append(s)
    if missed:  # the first piece misled the window: the top 16 bits of every magnitude
        hist_of = {id(s): torch.zeros(_DIGITS, dtype=torch.int64) for s in missed}
        for ctx, inputs in pieces():
            inputs = upcast(inputs)
            for s in missed:
                s.histogram(s.magnitude_bits(ctx, inputs), 0, hist_of[id(s)])
        for s in missed:
            s.choose(hist_of[id(s)], s.width <= 16)
            if not s.found:
                later.append(s)
    _collect_or_narrow(later, pieces, room)
    split = [s for s in selects if not s.done and s.last_tie >= numel and s.ties_kept < s.ties_total]
    recorded = [s for s in split if s.tie_pieces is not None]
    later_search = ranges is not None and piece is not None
    if not later_search:
        _locate_in_recorded_pieces(recorded, pieces, piece)
    _locate_last_ties([s for s in split if s.tie_pieces is None], pieces)
    out: dict[str, Any] = dict(sums)
    out.update({s.request.name: s.result() for s in selects})
    if later_search:
        assert ranges is not None and piece is not None
        out.update({s.request.name: TieSearch(s, ranges, pieces, piece) for s in recorded})
    return matrices.finish(out)


def _place_window(s: _Select, room: int, ones: torch.Tensor | None) -> torch.Tensor:
    """Place ``s``'s window from the pieces sampled so far and count them; returns the ones
    the windows add up (shared by the selections of a pass)."""
    assert s.sample is not None
    sample, s.sample = s.sample, None
    if ones is None:
        ones = torch.ones(max(bits.numel() for _, bits in sample), dtype=torch.int32)
    s.window = _Window(s, torch.cat([bits for _, bits in sample]) if len(sample) > 1 else sample[0][1], room, ones)
    for index, bits in sample:
        s.window.count(index, bits)
    return ones


def _collect_or_narrow(selects: list[_Select], pieces: Pieces, room: int) -> None:
    """For selections whose bucket is chosen: collect the buckets that fit in ``room``
    candidates (one pass) and settle them; narrow the others digit by digit (a pass each)."""
    collecting, narrowing = [], []
    for s in selects:
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


class TieSearch:
    """A selection whose last tie kept is still to be found, in a known run of pieces, by the
    evaluation that follows the statistics pass and goes through the pieces in order anyway: as
    it passes the run, the piece's values are at hand, and counting their ties costs a fraction
    of evaluating the piece once more (a tenth of a TIES merge of SD1 did only that).

    :meth:`for_piece` gives the :class:`Selection` a piece needs: up to the piece holding the
    last tie kept, every tie of a piece is kept (``last_tie`` the key's size); from there on,
    the selection itself. A piece evaluated out of that order (past the first piece of the
    run not yet counted) has the run's pieces evaluated again to find it, as the statistics
    pass does without ``ranges``."""

    def __init__(self, select: _Select, ranges: Sequence[tuple[int, int]], pieces: Pieces, piece: Piece):
        assert select.tie_pieces is not None
        self.select, self.pieces, self.piece = select, pieces, piece
        first, last = select.tie_pieces
        self.position = ranges[first][0]  # the first element of the run not counted yet
        self.run_stop = ranges[last][1]
        self.left = select.tie_rank  # the ties kept still to pass, the last one included
        self.every_tie = select.result()  # last_tie: the key's size
        self.found: Selection | None = None

    def for_piece(self, ctx: MergeContext, inputs: Sequence[Any]) -> Selection:
        """The selection for the piece ``ctx`` (elements ``ctx.start:ctx.stop``), whose inputs
        to the method are ``inputs``."""
        if self.found is not None:
            return self.found
        if ctx.stop is not None and ctx.stop <= self.position:  # its ties all lie before the last one kept
            return self.every_tie
        if ctx.stop is None or ctx.start != self.position or ctx.start >= self.run_stop:
            # out of order (or past the run, which cannot hold fewer ties than counted): look
            # the way the statistics pass does
            _locate_in_recorded_pieces([self.select], self.pieces, self.piece)
            self.found = self.select.result()
            return self.found
        count = self.select.pass_ties(ctx, self.select.magnitude_bits(ctx, upcast(inputs)), self.left)
        if count >= self.left:
            self.found = self.select.result()
            return self.found
        self.left -= count
        self.position = ctx.stop
        return self.every_tie


def _locate_in_recorded_pieces(selects: list[_Select], pieces: Pieces, piece: Piece | None) -> None:
    """The last tie kept of selections whose window counts said which run of pieces holds it
    (and how many of that run's ties are kept): the run's pieces are evaluated again, in order,
    up to the one holding it."""
    wanted: dict[int, list[_Select]] = {}  # piece index -> the selections whose run holds it
    left = {}  # the ties still to pass, per selection, as its run is walked
    for s in selects:
        assert s.tie_pieces is not None
        first, last = s.tie_pieces
        left[id(s)] = s.tie_rank
        for i in range(first, last + 1):
            wanted.setdefault(i, []).append(s)
    if piece is not None:
        found = ((i, *piece(i)) for i in sorted(wanted))
    else:
        found = ((i, ctx, inputs) for i, (ctx, inputs) in enumerate(pieces()) if i in wanted)
    pending = len(selects)
    for i, ctx, inputs in found:
        inputs = upcast(inputs)
        for s in wanted[i]:
            if left[id(s)] <= 0:  # found in an earlier piece of its run
                continue
            count = s.pass_ties(ctx, s.magnitude_bits(ctx, inputs), left[id(s)])
            if count >= left[id(s)]:
                pending -= 1
            left[id(s)] -= count
        if not pending:
            return


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
            count = s.pass_ties(ctx, _bits(s.request.of(ctx, *inputs).abs()), s.ties_kept - seen[i])
            if seen[i] + count >= s.ties_kept:
                pending.discard(i)
            seen[i] += count
        if not pending:
            return
