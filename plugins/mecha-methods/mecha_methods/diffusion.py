"""Methods from the diffusion-model mergers (supermerger, sd-meh, sd-mecha): cosine-weighted
sums, train difference, perpendicular add, frequency crossover, Procrustes rotation, clamping.
"""

from __future__ import annotations

import functools

from mecha_core.lazy import torch

from mecha_core import WEIGHT, Total, merge_method
from mecha_core.kit.reductions import dot64, norm64

from ._checks import fraction
from ._precision import in_float32


def _copies(count: int):
    """A ``working_set``: ``count`` float32 (or wider) copies of the key besides the inputs and
    the result, for methods that cannot be sliced (their reductions run along a whole
    dimension, or an FFT takes every element)."""

    def working_set(info, inputs: int, itemsize: int) -> int:
        return count * info.numel * max(itemsize, 4)

    return working_set


def _as_columns(x: torch.Tensor) -> torch.Tensor:
    # a 0-d tensor (logit_scale, ...) is treated as a 1-element vector
    return x.reshape(1) if x.dim() == 0 else x


def _cosine_lerp(a: torch.Tensor, b: torch.Tensor, similarity: torch.Tensor, alpha: float) -> torch.Tensor:
    k = 1 - torch.clamp(similarity - alpha, 0, 1)
    return (1 - k) * a + k * b


@merge_method(spaces=WEIGHT, returns=WEIGHT, working_set=_copies(6),
              formula="lerp(a, b, k),  k = 1 − clamp(cos_dim0(a/‖a‖₀, b/‖b‖₀) − alpha, 0, 1)")
@in_float32
def add_cosine_a(a, b, *, alpha: float = 0.0):
    """supermerger's cosineA, per key: move toward b where a and b are dissimilar.

    a and b are normalised along dim 0, and their cosine similarity along dim 0 gives one value
    per column (a single value for a 1-D tensor). k = 1 − clamp(similarity − alpha, 0, 1) and the
    result is (1 − k)·a + k·b: similar columns keep a, dissimilar ones take b; a larger alpha
    takes more of b (alpha ≥ 1 gives b everywhere, so the default is 0).

    Difference from supermerger: supermerger first rescales each key's similarity by the
    1st–99th percentile range of the similarities of all keys, which needs a pass over the whole
    model; here each key stands alone.
    """
    a1, b1 = _as_columns(a), _as_columns(b)
    na = torch.nn.functional.normalize(a1, dim=0)
    nb = torch.nn.functional.normalize(b1, dim=0)
    sim = torch.nn.functional.cosine_similarity(na, nb, dim=0)
    return _cosine_lerp(a1, b1, sim, alpha).reshape(a.shape)


@merge_method(spaces=WEIGHT, returns=WEIGHT, working_set=_copies(5),
              formula="lerp(a, b, k),  k = 1 − clamp((cos_dim0(a, b) + a·b/(‖a‖‖b‖))/2 − alpha, 0, 1)")
@in_float32
def add_cosine_b(a, b, *, alpha: float = 0.0):
    """supermerger's cosineB, per key: add_cosine_a with a similarity that also sees the whole tensor.

    The similarity is the mean of the per-column cosine along dim 0 and the cosine of the whole
    flattened tensors.

    k = 1 − clamp(similarity − alpha, 0, 1); result (1 − k)·a + k·b. As with add_cosine_a,
    supermerger rescales by percentiles over all keys first; this variant works per key.
    """
    a1, b1 = _as_columns(a), _as_columns(b)
    sim = torch.nn.functional.cosine_similarity(a1, b1, dim=0)
    whole = (dot64(a1, b1) / torch.clamp(norm64(a1) * norm64(b1), min=1e-8)).to(a1.dtype)
    return _cosine_lerp(a1, b1, (sim + whole) / 2, alpha).reshape(a.shape)


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


def _radial_frequency(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For each bin of rfftn(x) of this shape, the RMS over dims of |frequency| / Nyquist, in [0, 1]."""
    axes = []
    for i, n in enumerate(shape):
        freq = torch.fft.rfftfreq if i == len(shape) - 1 else torch.fft.fftfreq
        axes.append(freq(n, dtype=torch.float64, device=device).abs() / 0.5)
    grids = torch.meshgrid(*axes, indexing="ij")
    sizes = [n for n in shape if n > 1] or [1]
    return (sum(g ** 2 for g in grids) / len(sizes)).sqrt()


@merge_method(working_set=_copies(10),
              formula="irfftn((1 − F)·rfftn(a) + F·rfftn(b)),  F = (1 − tilt)·[r > 1 − alpha] + tilt·alpha")
@in_float32
def crossover(a, b, *, alpha: float = 0.5, tilt: float = 0.0):
    """Frequency crossover: the low spatial frequencies of a with the high ones of b.

    Both tensors go through a real N-d FFT (all dims). Each frequency bin has a radial frequency
    r in [0, 1] (the root mean square over the tensor's dims of |frequency| / Nyquist, dims of
    size 1 left out). The filter F takes b for bins with r > 1 − alpha and a for the rest
    (alpha = 0 gives a, alpha = 1 gives b); tilt in [0, 1] blends F toward the constant alpha,
    and tilt = 1 is exactly weighted_sum(a, b, alpha). A 0-d tensor gets weighted_sum.
    (sd-mecha's crossover uses a smooth filter of its own; this one is a sharp, documented cut.)
    """
    alpha = fraction("crossover", "alpha", alpha)
    tilt = fraction("crossover", "tilt", tilt)
    if a.dim() == 0:
        return (1 - alpha) * a + alpha * b
    shape = tuple(a.shape)
    r = _radial_frequency(shape, a.device)
    step = (r > 1 - alpha) if alpha < 1 else torch.ones_like(r, dtype=torch.bool)
    f = ((1 - tilt) * step.to(torch.float64) + tilt * alpha).to(a.dtype)
    spectrum = (1 - f) * torch.fft.rfftn(a) + f * torch.fft.rfftn(b)
    return torch.fft.irfftn(spectrum, s=shape)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    # linear (out, in) stays; a conv (out, in, kh, kw) with a real kernel becomes (out·in, kh·kw),
    # as sd-mecha does, so the rotation acts on the small kernel space; a 1x1 conv (SD1's proj_in
    # and proj_out) is a linear layer in disguise: (out, in), else it would rotate a 1-D space
    if x.dim() > 2 and x.shape[2:].numel() != 1:
        return x.reshape(x.shape[0] * x.shape[1], -1)
    return x.reshape(x.shape[0], -1)


def _alignment(ca: torch.Tensor, cb: torch.Tensor, fractional: bool) -> torch.Tensor:
    """Q, the orthogonal matrix best mapping ca's rows onto cb's (Q = U·Vᵀ from the SVD of
    caᵀ·cb), made fit for a fractional power when ``fractional``:

    - where caᵀ·cb is rank-deficient (a wide layer: fewer rows than columns) the data fix Q only
      on U's first r columns; the SVD fills the rest with an arbitrary basis, and a fractional
      power mixes that arbitrariness into the result. The rest is completed instead with the
      orthogonal map between the two complements closest to the identity (the polar factor of
      (I − UᵣUᵣᵀ)(I − VᵣVᵣᵀ)), which depends on ca and cb alone;
    - a reflection (det −1) has no real fractional power: the weakest direction is flipped,
      giving the nearest proper rotation (Kabsch), as sd-mecha does.
    """
    u, s, vh = torch.linalg.svd(ca.T @ cb)
    if not fractional:
        return u @ vh
    n = u.shape[0]
    tol = float(s[0]) * max(ca.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
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
    powered = vectors @ torch.diag(values ** power) @ torch.linalg.inv(vectors)
    return powered.real.to(q.dtype)


def _rotate_working_set(info, inputs: int, itemsize: int) -> int:
    """rotate's peak: about eight copies of the matrix (inputs, centred rows, the rotated
    neurons, the result, in float32 at least) and a dozen d×d matrices (the SVD's factors, the
    completion and the float64/complex fractional power), d the matrix's columns."""
    shape = tuple(info.shape)
    if len(shape) < 2:
        return 0
    columns = 1
    for d in (shape[2:] if len(shape) > 2 and _kernel(shape) != 1 else shape[1:]):
        columns *= d
    return 8 * info.numel * max(itemsize, 4) + 12 * columns * columns * 16


def _kernel(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape[2:]:
        size *= d
    return size


@merge_method(working_set=_rotate_working_set,
              formula="lerp(a_c, b_c·Qᵀ, alpha)·Q^alignment + lerp(mean_a, mean_b, alignment),  "
                      "Q = argmin_orthogonal ‖a_c·Q − b_c‖")
@in_float32
def rotate(a, b, *, alignment: float = 1.0, alpha: float = 0.0, centralization: float = 1.0):
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
    (sd-mecha interpolates on the Stiefel manifold there instead; results differ). The full SVD
    is used, so large square layers cost one d×d SVD each (two for fractional wide ones).
    """
    if a.dim() < 2:
        return (1 - alpha) * a + alpha * b
    ma, mb = _as_matrix(a), _as_matrix(b)
    mean_a = ma.mean(dim=0, keepdim=True) * centralization
    mean_b = mb.mean(dim=0, keepdim=True) * centralization
    ca, cb = ma - mean_a, mb - mean_b
    q = _alignment(ca, cb, fractional=alignment != round(alignment))
    neurons = ca if alpha == 0 else (1 - alpha) * ca + alpha * (cb @ q.T)
    out = neurons @ _orthogonal_power(q, alignment) + ((1 - alignment) * mean_a + alignment * mean_b)
    return out.reshape(a.shape)


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
