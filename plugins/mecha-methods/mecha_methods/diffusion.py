"""Methods from the diffusion-model mergers (supermerger, sd-meh, sd-mecha): cosine-weighted
sums, train difference, perpendicular add, frequency crossover, Procrustes rotation, clamping.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from mecha_core.lazy import torch

from mecha_core import WEIGHT, CrossTotal, Derived, RowStack, Total, merge_method

from ._checks import fraction
from ._precision import in_float32


def _column_width(info) -> int:
    """Elements per row along dim 0: the number of columns reductions along dim 0 give (1 for a
    vector or a 0-d tensor, which are one column)."""
    shape = tuple(info.shape)
    if len(shape) < 2 or not info.numel:
        return 1
    return info.numel // shape[0]


def _cosine_statistics(similarity):
    """The statistics of a cosine-weighted sum: per column (along dim 0) the float64 sums of
    a·a, b·b and a·b, then k = 1 − clamp(similarity − alpha, 0, 1) per column, computed once
    per key from them by ``similarity(aa, bb, ab)``."""

    def statistics(ctx, inputs, *, alpha: float = 0.0):
        width = _column_width(ctx.info)

        def k(stats):
            sim = similarity(stats["aa"], stats["bb"], stats["ab"])
            return 1 - torch.clamp(sim - alpha, 0, 1)

        return [Total("aa", lambda ctx, a, b: a * a, per=width), Total("bb", lambda ctx, a, b: b * b, per=width),
                Total("ab", lambda ctx, a, b: a * b, per=width), Derived("k", k)]

    return statistics


def _per_element(columns: torch.Tensor, ctx, like: torch.Tensor) -> torch.Tensor:
    """A per-column value for each element of ``like`` (a piece of the key starting at flat index
    ``ctx.start``; the key laid out in rows of ``columns.numel()``), shaped like ``like``."""
    width = columns.numel()
    n = like.numel()
    offset = ctx.start % width
    rows = (offset + n + width - 1) // width
    spread = columns.expand(rows, width).reshape(-1)[offset:offset + n]
    return spread.reshape(like.shape)


def _cosine_lerp(a: torch.Tensor, b: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
    kk = _per_element(k.to(a.dtype), ctx, a)
    return (1 - kk) * a + kk * b


def _cosine_a(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    # torch's normalize (x / max(‖x‖, 1e-12)) then cosine_similarity (x·y / (max(‖x‖, 1e-8)·
    # max(‖y‖, 1e-8))), from the float64 column sums
    na, nb = aa.sqrt(), bb.sqrt()
    da, db = na.clamp(min=1e-12), nb.clamp(min=1e-12)
    return ab / (da * db) / ((na / da).clamp(min=1e-8) * (nb / db).clamp(min=1e-8))


def _cosine_b(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    columns = ab / (aa.sqrt().clamp(min=1e-8) * bb.sqrt().clamp(min=1e-8))
    whole = ab.sum() / torch.clamp(aa.sum().sqrt() * bb.sum().sqrt(), min=1e-8)
    return (columns + whole) / 2


@merge_method(spaces=WEIGHT, returns=WEIGHT, elementwise=True, statistics=_cosine_statistics(_cosine_a),
              formula="lerp(a, b, k),  k = 1 − clamp(cos_dim0(a/‖a‖₀, b/‖b‖₀) − alpha, 0, 1)")
@in_float32
def add_cosine_a(a, b, *, alpha: float = 0.0, stats=None, ctx=None):
    """supermerger's cosineA, per key: move toward b where a and b are dissimilar.

    a and b are normalised along dim 0, and their cosine similarity along dim 0 gives one value
    per column (a single value for a 1-D tensor). k = 1 − clamp(similarity − alpha, 0, 1) and the
    result is (1 − k)·a + k·b: similar columns keep a, dissimilar ones take b; a larger alpha
    takes more of b (alpha ≥ 1 gives b everywhere, so the default is 0). The norms and dot
    products are torch's (normalize, then cosine_similarity, with their eps guards of 1e-12
    and 1e-8), summed in float64 over slices of the key: the result is element-wise given
    them (bounded memory for any size).

    Difference from supermerger: supermerger first rescales each key's similarity by the
    1st–99th percentile range of the similarities of all keys, which needs a pass over the whole
    model; here each key stands alone.
    """
    return _cosine_lerp(a, b, stats["k"], ctx)


@merge_method(spaces=WEIGHT, returns=WEIGHT, elementwise=True, statistics=_cosine_statistics(_cosine_b),
              formula="lerp(a, b, k),  k = 1 − clamp((cos_dim0(a, b) + a·b/(‖a‖‖b‖))/2 − alpha, 0, 1)")
@in_float32
def add_cosine_b(a, b, *, alpha: float = 0.0, stats=None, ctx=None):
    """supermerger's cosineB, per key: add_cosine_a with a similarity that also sees the whole tensor.

    The similarity is the mean of the per-column cosine along dim 0 and the cosine of the whole
    flattened tensors (each a·b / (max(‖a‖, 1e-8)·max(‖b‖, 1e-8)), as torch's
    cosine_similarity; the whole tensor's denominator is max(‖a‖·‖b‖, 1e-8)), the sums taken
    in float64 over slices of the key.

    k = 1 − clamp(similarity − alpha, 0, 1); result (1 − k)·a + k·b. As with add_cosine_a,
    supermerger rescales by percentiles over all keys first; this variant works per key.
    """
    return _cosine_lerp(a, b, stats["k"], ctx)


@merge_method(elementwise=True, spaces=WEIGHT, returns=WEIGHT,
              formula="a + (b − c)·1.8·alpha·|b − a| / (|b − c| + |b − a|)")
def train_difference(a, b, c, *, alpha: float = 1.0):
    """supermerger's trainDifference: add b − c to a as if b had been trained from a.

    Per entry, the difference b − c is scaled by 1.8·alpha·|b − a| / (|b − c| + |b − a|)
    (0 where both are 0): where a already equals b little is added, where a is far from b the
    difference is added almost fully (up to 1.8·alpha).
    """
    diff = b - c
    dist = (b - a).abs()
    denom = diff.abs() + dist
    scale = torch.where(denom > 0, dist / torch.where(denom > 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    return a + diff * (1.8 * alpha) * scale


def _perpendicular_statistics(ctx, inputs, **_):
    return [Total("aa", lambda ctx, a, b, c: (a - c) * (a - c)), Total("ab", lambda ctx, a, b, c: (a - c) * (b - c))]


@merge_method(spaces=WEIGHT, returns=WEIGHT, elementwise=True, statistics=_perpendicular_statistics,
              formula="a + alpha·(d_b − d_a·(d_a·d_b)/‖d_a‖²),  d_a = a − c, d_b = b − c")
@in_float32
def add_perpendicular(a, b, c, *, alpha: float = 1.0, stats=None):
    """Add to a the part of b − c orthogonal to a − c: b's change, minus what a already has.

    The tensors are flattened; the component of b − c along a − c is removed and the rest is
    added to a, scaled by alpha. The dot products are summed in float64 over slices of the key,
    so the result is element-wise given them (bounded memory for any size).

    When a equals c (‖a − c‖ = 0) nothing is projected out and all of b − c is added (sd-mecha
    adds nothing in that case).
    """
    da, db = a - c, b - c
    norm2 = stats["aa"]  # float64: float32 sums drift with the tensor's size
    perp = db - da * (stats["ab"] / norm2) if norm2 > 0 else db
    return a + alpha * perp


#: Elements of the spectrum one step of crossover's FFTs works on at a time.
_FFT_BLOCK = 1 << 21


def _spectrum_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] // 2 + 1)


def _crossover_working_set(info, inputs: int, itemsize: int) -> int:
    """crossover's peak besides a slice of rows: the spectrum of b − a (one complex number per
    bin of rfftn, in float32 at least) and a block's temporaries (its inputs, its transform and
    the FFT's own buffers: about six blocks), or for a vector, whose FFT is one block, three
    more copies of it."""
    shape = tuple(info.shape)
    width = 2 * max(itemsize, 4)
    if len(shape) == 0:
        return 0
    bins = 1
    for d in _spectrum_shape(shape):
        bins *= d
    if len(shape) == 1:
        return bins * width + 3 * info.numel * max(itemsize, 4)
    return bins * width + 6 * min(bins, _FFT_BLOCK) * width


def _radial_frequency(shape: tuple[int, ...], rows: slice, device: torch.device) -> torch.Tensor:
    """For the bins ``rows`` (along dim 0) of rfftn(x) of this shape, the RMS over dims of
    |frequency| / Nyquist, in [0, 1] (float64)."""
    axes = []
    for i, n in enumerate(shape):
        freq = torch.fft.rfftfreq if i == len(shape) - 1 else torch.fft.fftfreq
        axis = freq(n, dtype=torch.float64, device=device).abs() / 0.5
        axes.append(axis[rows] if i == 0 else axis)
    grids = torch.meshgrid(*axes, indexing="ij")
    sizes = [n for n in shape if n > 1] or [1]
    return (sum(g ** 2 for g in grids) / len(sizes)).sqrt()


def _blocks(total: int, per_item: int) -> list[slice]:
    """Consecutive slices of ``range(total)``, each of about _FFT_BLOCK elements of items of
    ``per_item`` elements (at least one item a block)."""
    step = max(1, _FFT_BLOCK // max(1, per_item))
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _transform_leading(spectrum: torch.Tensor, inverse: bool) -> None:
    """The (inverse) FFT along every dim but the last, in place, in blocks of the last dim."""
    fft = torch.fft.ifft if inverse else torch.fft.fft
    per_column = spectrum.numel() // spectrum.shape[-1]
    for d in range(spectrum.dim() - 1):
        for cols in _blocks(spectrum.shape[-1], per_column):
            spectrum[..., cols] = fft(spectrum[..., cols], dim=d)


def _crossover_statistics(ctx, inputs, *, alpha: float = 0.5, tilt: float = 0.0):
    """Each row's FFT along the last dim of b − a (a row stack), then once per key the FFT along
    the other dims, the filter and the inverse FFT along those dims, in place: what is left per
    row is the inverse FFT along the last dim, done row-wise."""
    alpha = fraction("crossover", "alpha", alpha)
    tilt = fraction("crossover", "tilt", tilt)
    shape = tuple(ctx.info.shape)
    if len(shape) < 2:
        return []

    def rows(ctx, a, b):
        return torch.fft.rfft((b - a).reshape(-1, *shape[1:]), dim=-1)

    def spectrum(stats):
        spectrum = stats.pop("rfft")
        _transform_leading(spectrum, inverse=False)
        real = spectrum.real.dtype
        for block in _blocks(shape[0], spectrum.numel() // shape[0]):
            spectrum[block] *= _filter(shape, block, alpha, tilt, spectrum.device).to(real)
        _transform_leading(spectrum, inverse=True)
        return spectrum

    return [RowStack("rfft", rows), Derived("spectrum", spectrum)]


@merge_method(rowwise=True, statistics=_crossover_statistics, working_set=_crossover_working_set,
              formula="irfftn((1 − F)·rfftn(a) + F·rfftn(b)),  F = (1 − tilt)·[r > 1 − alpha] + tilt·alpha")
def crossover(a, b, *, alpha: float = 0.5, tilt: float = 0.0, stats=None, ctx=None):
    """Frequency crossover: the low spatial frequencies of a with the high ones of b.

    Both tensors go through a real N-d FFT (all dims). Each frequency bin has a radial frequency
    r in [0, 1] (the root mean square over the tensor's dims of |frequency| / Nyquist, dims of
    size 1 left out). The filter F takes b for bins with r > 1 − alpha and a for the rest
    (alpha = 0 gives a, alpha = 1 gives b); tilt in [0, 1] blends F toward the constant alpha,
    and tilt = 1 is exactly weighted_sum(a, b, alpha). A 0-d tensor gets weighted_sum.
    (sd-mecha's crossover uses a smooth filter of its own; this one is a sharp, documented cut.)

    It is computed as a + irfftn(F·rfftn(b − a)) (the same by linearity; float32 at least), one
    dim at a time: the FFT along the last dim row by row over slices of rows, the other dims'
    FFTs, the filter and their inverses in place in blocks, then the last dim's inverse row by
    row. Memory: one spectrum (about half a complex number per element) besides a slice of rows.
    """
    alpha = fraction("crossover", "alpha", alpha)
    tilt = fraction("crossover", "tilt", tilt)
    dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    spectrum = stats.get("spectrum")
    if spectrum is None:  # fewer than 2 dims: one FFT of the whole (small) vector
        if a.dim() == 0:
            return (1 - alpha) * a + alpha * b
        diff = torch.fft.rfft(b.to(dtype) - a.to(dtype))
        diff *= _filter(tuple(a.shape), slice(None), alpha, tilt, a.device).to(dtype)
        return (a.to(dtype) + torch.fft.irfft(diff, n=a.shape[-1])).to(a.dtype)
    shape = tuple(ctx.info.shape)
    row = ctx.info.numel // shape[0]
    first, count = ctx.start // row, a.numel() // row
    rows = a.reshape(count, *shape[1:]).to(dtype)
    rows = rows + torch.fft.irfft(spectrum[first:first + count], n=shape[-1], dim=-1)
    return rows.reshape(a.shape).to(a.dtype)


def _filter(shape: tuple[int, ...], rows: slice, alpha: float, tilt: float, device: torch.device) -> torch.Tensor:
    """F for the bins ``rows`` (along dim 0) of the spectrum (float64)."""
    r = _radial_frequency(shape, rows, device)
    step = (r > 1 - alpha) if alpha < 1 else torch.ones_like(r, dtype=torch.bool)
    return (1 - tilt) * step.to(torch.float64) + tilt * alpha


def _alignment(cross: torch.Tensor, rows: int, fractional: bool) -> torch.Tensor:
    """Q, the orthogonal matrix best mapping ca's rows onto cb's (Q = U·Vᵀ from the SVD of
    ``cross`` = caᵀ·cb, ca having ``rows`` rows), made fit for a fractional power when
    ``fractional``:

    - where caᵀ·cb is rank-deficient (a wide layer: fewer rows than columns) the data fix Q only
      on U's first r columns; the SVD fills the rest with an arbitrary basis, and a fractional
      power mixes that arbitrariness into the result. The rest is completed instead with the
      orthogonal map between the two complements closest to the identity (the polar factor of
      (I − UᵣUᵣᵀ)(I − VᵣVᵣᵀ)), which depends on ca and cb alone;
    - a reflection (det −1) has no real fractional power: the weakest direction is flipped,
      giving the nearest proper rotation (Kabsch), as sd-mecha does.
    """
    u, s, vh = torch.linalg.svd(cross)
    if not fractional:
        return u @ vh
    n = u.shape[0]
    tol = float(s[0]) * max(rows, n) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    r = int((s > tol).sum())
    if r < n:
        ur, vr = u[:, :r], vh[:r].T
        eye = torch.eye(n, dtype=u.dtype, device=u.device)
        # Q maps Vᵣ's directions to Uᵣ's (columns); the completion maps Vᵣ's complement to Uᵣ's
        x, _, yh = torch.linalg.svd((eye - ur @ ur.T) @ (eye - vr @ vr.T))
        x, yh = x[:, :n - r], yh[:n - r]  # the complements: weakest direction last
        q = ur @ vr.T + x @ yh
        if torch.linalg.det(q) < 0:
            q = q - 2 * x[:, -1:] @ yh[-1:]
        return q
    if torch.linalg.det(u @ vh) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh


def _orthogonal_power(q: torch.Tensor, power: float) -> torch.Tensor:
    if power == 1:
        return q
    if power == 0:
        return torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
    values, vectors = torch.linalg.eig(q.to(torch.float64))
    powered = (vectors * values ** power) @ torch.linalg.inv(vectors)  # V·diag(λ^p)·V⁻¹
    return powered.real.to(q.dtype)


def _kernel(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape[2:]:
        size *= d
    return size


def _matrix_width(shape: tuple[int, ...]) -> int:
    """Columns of rotate's matrix (see _as_matrix): a real kernel's size for a conv, else a row
    along dim 0."""
    columns = 1
    for d in (shape[2:] if len(shape) > 2 and _kernel(shape) != 1 else shape[1:]):
        columns *= d
    return columns


def _thin(rows: int, width: int, alignment: float) -> bool:
    """rotate works from the rows themselves instead of the d×d matrices: a wide matrix (fewer
    rows than columns, so aᵀb has rank ≤ rows) with alignment 0 or 1, which apply Q once."""
    return rows < width and alignment in (0, 1)


def _rotate_working_set(info, inputs: int, itemsize: int, *, alignment: float = 1.0, **_) -> int:
    """rotate's peak besides one slice of rows (measured; tests/test_rotate_memory.py of
    mecha-methods checks a wide key's).

    A wide matrix (r rows < d columns) at alignment 0 or 1: the rows of a and b (float32) kept
    through the passes, then float64 work on r × d frames (a reduced QR holds its input, its
    copy and the frame before: about four r × d float64 matrices) and the r × r SVD's: measured
    (the whole step, rows included) on keys from 64 × 4096 to 2048 × 5632 within
    36·r·d + 56·r² bytes; then two r × d float32 matrices for the row-wise pass. Otherwise
    d×d matrices: the float64 cross product during the passes, then
    its float32 copy, the copy LAPACK works on, the SVD's factors, its workspace (about 4·d²
    floats) and Q (about 40·d² bytes at most); a fractional alignment adds the completion's SVD
    and the complex float64 eigendecomposition for the power (about 80·d² more)."""
    shape = tuple(info.shape)
    if len(shape) < 2:
        return 0
    d = _matrix_width(shape)
    rows = info.numel // d
    if _thin(rows, d, alignment):
        return 36 * rows * d + 56 * rows * rows
    return (40 + (80 if alignment != round(alignment) else 0)) * d * d


class _Rotation(NamedTuple):
    """What rotate applies to every row of a key, computed once from its statistics."""

    q: "torch.Tensor | None"
    """Q (float32), to bring b's rows into a's frame when alpha ≠ 0; else None."""
    power: "torch.Tensor"
    """Q^alignment (float32)."""
    mean_a: "torch.Tensor"
    """centralization · a's mean row (float32)."""
    mean_b: "torch.Tensor"
    """centralization · b's mean row (float32)."""
    shift: "torch.Tensor"
    """(1 − alignment)·mean_a + alignment·mean_b, added to every rotated row (float32)."""


class _Turn(NamedTuple):
    """What rotate applies to every row of a wide key at alignment 0 or 1 (Q in factored form),
    computed once from its statistics. Q maps span(U) onto span(V) (U, V: the singular vectors
    of a_cᵀ·b_c for its nonzero singular values, d × r each); x ↦ x·Q is then
    x + (x·U)·(V − U)ᵀ, which is x·U·Vᵀ for the rows of a_c (they lie in span(U)) and leaves
    what lies outside span(U) as it is (nothing, unless aᵀb has a lower rank than a_c)."""

    source: "torch.Tensor"
    """U (float32, d × r) at alignment 1, where a_c is turned by Q; V at alignment 0, where b_c
    is turned back by Qᵀ."""
    turn: "torch.Tensor"
    """V − U at alignment 1, U − V at alignment 0 (float32, d × r)."""
    mean_a: "torch.Tensor"
    """centralization · a's mean row (float32)."""
    mean_b: "torch.Tensor"
    """centralization · b's mean row (float32)."""
    shift: "torch.Tensor"
    """(1 − alignment)·mean_a + alignment·mean_b, added to every result row (float32)."""


def _frame(rows: torch.Tensor, mean: torch.Tensor):
    """(F, R) with F (d × r, orthonormal columns) and R (r × r) such that (rows − mean)ᵀ = F·R:
    the centred rows (float64, centred in place) through a reduced QR."""
    centred = rows.to(torch.float64)
    del rows  # the caller's reference is gone too: the float32 rows are let go here
    centred -= mean
    return torch.linalg.qr(centred.T)


def _thin_turn(stats, rows: int, width: int, alignment: float, c: float) -> _Turn:
    """Q for a wide matrix from its rows, without any d×d matrix: with (a_c)ᵀ = Fa·Ra and
    (b_c)ᵀ = Fb·Rb, a_cᵀ·b_c = Fa·(Ra·Rbᵀ)·Fbᵀ, so the SVD X·Σ·Yᵀ of the r × r matrix
    Ra·Rbᵀ gives those of a_cᵀ·b_c: U = Fa·X, V = Fb·Y, the same singular values (exact
    algebra; float64). Singular values at or below the rank tolerance (s₀·max(rows, d)·eps)
    are left out: Q is not fixed there by the data."""
    m_a, m_b = stats["sum_a"] / rows, stats["sum_b"] / rows
    frame_a, tri_a = _frame(stats.pop("rows_a").reshape(rows, width), c * m_a)
    frame_b, tri_b = _frame(stats.pop("rows_b").reshape(rows, width), c * m_b)
    x, s, yh = torch.linalg.svd(tri_a @ tri_b.T)
    del tri_a, tri_b
    tol = float(s[0]) * max(rows, width) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    r = int((s > tol).sum())
    u = frame_a @ x[:, :r]
    del frame_a
    v = frame_b @ yh[:r].T
    del frame_b
    source, target = (u, v) if alignment == 1 else (v, u)
    target -= source
    return _Turn(source.to(torch.float32), target.to(torch.float32), (c * m_a).to(torch.float32),
                 (c * m_b).to(torch.float32), ((1 - alignment) * c * m_a + alignment * c * m_b).to(torch.float32))


def _rotate_statistics(ctx, inputs, *, alignment: float = 1.0, alpha: float = 0.0, centralization: float = 1.0):
    """Column sums, then either the rows of a and b (a wide matrix at alignment 0 or 1, see
    _thin_turn) or the float64 cross product aᵀ·b, then the rotation."""
    shape = tuple(ctx.info.shape)
    if len(shape) < 2:
        return []
    width = _matrix_width(shape)
    rows = ctx.info.numel // width
    sums = [Total("sum_a", lambda ctx, a, b: a, per=width), Total("sum_b", lambda ctx, a, b: b, per=width)]
    if _thin(rows, width, alignment):
        row = ctx.info.numel // shape[0]  # a row along dim 0 (the pieces hold whole ones)
        # the rows as given (half precision already upcast to float32; a float64 work dtype kept)
        return [*sums, RowStack("rows_a", lambda ctx, a, b: a.reshape(-1, row)),
                RowStack("rows_b", lambda ctx, a, b: b.reshape(-1, row)),
                Derived("rotation", lambda stats: _thin_turn(stats, rows, width, alignment, centralization))]

    def rotation(stats) -> _Rotation:
        c = centralization
        m_a, m_b = stats["sum_a"] / rows, stats["sum_b"] / rows
        # Σ (a_i − c·m_a)(b_i − c·m_b)ᵀ = aᵀb − rows·c·(2 − c)·m_a·m_bᵀ, in float64, in place; the
        # float64 matrix is let go before the SVD (d² of them, with LAPACK's workspace, are the peak)
        cross = stats.pop("cross").addr_(m_a, m_b, alpha=-rows * c * (2 - c)).to(torch.float32)
        q = _alignment(cross, rows, fractional=alignment != round(alignment))
        del cross
        mean_a, mean_b = (c * m_a).to(torch.float32), (c * m_b).to(torch.float32)
        shift = ((1 - alignment) * c * m_a + alignment * c * m_b).to(torch.float32)
        return _Rotation(q if alpha != 0 else None, _orthogonal_power(q, alignment), mean_a, mean_b, shift)

    return [*sums, CrossTotal("cross", lambda ctx, a, b: a, lambda ctx, a, b: b, width), Derived("rotation", rotation)]


@merge_method(rowwise=True, statistics=_rotate_statistics, working_set=_rotate_working_set,
              formula="lerp(a_c, b_c·Qᵀ, alpha)·Q^alignment + lerp(mean_a, mean_b, alignment),  "
                      "Q = argmin_orthogonal ‖a_c·Q − b_c‖")
@in_float32
def rotate(a, b, *, alignment: float = 1.0, alpha: float = 0.0, centralization: float = 1.0, stats=None):
    """Rotate a's neurons toward b's (orthogonal Procrustes), optionally also blending them.

    The tensor becomes a matrix (linear and 1x1 conv: out × in; conv: (out·in) × (kh·kw)); each row is a
    neuron. Rows are centred, a_c = a − centralization·mean_a (mean_a the mean row), likewise
    b_c. Q = U·Vᵀ from the SVD of a_cᵀ·b_c is the orthogonal matrix best mapping a_c onto b_c.
    The result is lerp(a_c, b_c·Qᵀ, alpha)·Q^alignment + centralization·lerp(mean_a, mean_b,
    alignment): alignment = 1 fully rotates a onto b's frame, fractions rotate part-way (a real
    matrix power through the eigendecomposition of Q); alpha moves the neurons toward b's before
    rotating (alignment = alpha = 1 gives b). When Q is a reflection (det −1) and alignment is
    not a whole number, Q is replaced by the nearest proper rotation (the last column of U
    negated), which has a real fractional power. Tensors of fewer than 2 dims get
    weighted_sum(a, b, alpha). For a wide layer (fewer rows than columns) the data fix Q only
    on the rows' span; for a fractional alignment the rest of Q is completed with the rotation
    between the complements closest to the identity, so the result depends on a and b alone
    (sd-mecha interpolates on the Stiefel manifold there instead; results differ); at
    alignment 0 or 1, which apply Q once, that rest never reaches a_c's or b_c's rows (any
    part of a_c outside the span the data fix, which only a rank-deficient aᵀb leaves, is kept
    as it is, as the SVD of a zero matrix would).

    The means are summed in float64 over slices of rows. A tall or square matrix (or a
    fractional or other whole alignment): a_cᵀ·b_c (from aᵀ·b and the means) is summed in
    float64 too, its SVD (float32) is of that d×d matrix, and the rows are then rotated slice
    by slice: memory is a slice of rows and a few d×d matrices, whatever the number of rows.
    A wide matrix (r rows < d columns) at alignment 0 or 1 never forms a d×d matrix: its rows
    are kept (float32), a reduced QR of each centred side (float64) turns a_cᵀ·b_c into an
    r × r matrix with the same singular values, whose SVD gives Q's r directions, and each
    slice of rows is turned through them: memory about 36·r·d + 56·r² bytes besides a slice
    (a 2048 × 5632 LLM down_proj: about 0.5 GB instead of 1.2 GB, and no 5632 × 5632 SVD).
    """
    if stats.get("rotation") is None:  # fewer than 2 dims
        return (1 - alpha) * a + alpha * b
    rotation = stats["rotation"]
    if rotation.mean_a.dtype != a.dtype:  # a float64 work dtype: the matrices follow it
        rotation = type(rotation)(*(None if t is None else t.to(a.dtype) for t in rotation))
        stats["rotation"] = rotation
    if isinstance(rotation, _Turn):
        return _turned(a, b, rotation, alignment, alpha)
    width = rotation.power.shape[0]
    ma, mb = a.reshape(-1, width), b.reshape(-1, width)
    ca = ma - rotation.mean_a
    if alpha == 0:
        neurons = ca
    else:
        neurons = (1 - alpha) * ca + alpha * ((mb - rotation.mean_b) @ rotation.q.T)
    return (neurons @ rotation.power + rotation.shift).reshape(a.shape)


def _turned(a, b, turn: _Turn, alignment: float, alpha: float):
    """rotate's rows for a wide key at alignment 1: (1 − alpha)·a_c·Q + alpha·b_c + shift
    (Q orthogonal: b_c·Qᵀ·Q = b_c), or at alignment 0: (1 − alpha)·a_c + alpha·b_c·Qᵀ + shift."""
    width = turn.source.shape[0]
    ca = a.reshape(-1, width) - turn.mean_a
    if alignment == 1:
        out = ca.addmm_(ca @ turn.source, turn.turn.T)
        if alpha:
            out = (1 - alpha) * out + alpha * (b.reshape(-1, width) - turn.mean_b)
    else:
        out = ca
        if alpha:
            cb = b.reshape(-1, width) - turn.mean_b
            out = (1 - alpha) * ca + alpha * cb.addmm_(cb @ turn.source, turn.turn.T)
    return (out + turn.shift).reshape(a.shape)


def _clamp_needs_bounds(spaces: dict) -> None:
    if not any("[" in label for label in spaces):
        raise ValueError("needs at least one bound after a (e.g. clamp(a, b, c))")


@merge_method(elementwise=True, check_spaces=_clamp_needs_bounds,
              formula="min(max(a, lo), hi),  lo/hi = elementwise min/max of bounds (pulled inward by stiffness)")
def clamp(a, *bounds, stiffness: float = 0.0):
    """Clip a, entry by entry, to the range spanned by the bounds (sd-mecha's clamp).

    hi and lo are the elementwise maximum and minimum of the bounds. With stiffness > 0 each
    limit is pulled toward the bound nearest to the bounds' mean on its side (the smallest bound
    at or above the mean for hi, the largest at or below it for lo):
    hi' = (1 − stiffness)·hi + stiffness·that bound, likewise lo'. stiffness = 0 is a plain clip
    to [min, max]; stiffness = 1 clips to the bounds nearest the mean.
    """
    hi = functools.reduce(torch.maximum, bounds)
    lo = functools.reduce(torch.minimum, bounds)
    if stiffness:
        mean = sum(bounds) / len(bounds)
        upper, lower = hi.clone(), lo.clone()
        for bound in bounds:
            upper = torch.where((bound >= mean) & (bound < upper), bound, upper)
            lower = torch.where((bound <= mean) & (bound > lower), bound, lower)
        hi = (1 - stiffness) * hi + stiffness * upper
        lo = (1 - stiffness) * lo + stiffness * lower
    return torch.minimum(torch.maximum(a, lo), hi)


DIFFUSION = [add_cosine_a, add_cosine_b, train_difference, add_perpendicular, crossover, rotate, clamp]
