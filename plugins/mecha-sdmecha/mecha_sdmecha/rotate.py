"""sd-mecha 1.1.8's ``rotate`` (its ``svd.py``): orthogonal Procrustes alignment of a's rows
to b's, with fractional alignments computed the way sd-mecha computes them.

Square and tall matrices (rows ≥ columns) are rotated by Q^t, the fractional power taken through
Q's complex eigendecomposition (reflections cancelled first when t is fractional). Wide matrices
use a low-rank rotation and, for a fractional t, sd-mecha's Stiefel-manifold geodesic (its
iterative matrix logarithm, always with eps 1e-8 and 100 iterations: sd-mecha accepts
``stiefel_eps``/``stiefel_max_iters`` but does not pass them on).
"""

from __future__ import annotations

import math
from typing import Any

from mecha_core.lazy import torch

from mecha_core import merge_method

from .working_sets import rotate_working_set


def _qr_pos(x: Any) -> tuple[Any, Any]:
    q, r = torch.linalg.qr(x)
    s = torch.sign(r.diagonal(offset=0, dim1=-2, dim2=-1))
    s[s == 0] = 1
    return q * s.unsqueeze(-2), r / s.unsqueeze(-1)


def _orthogonal_complete(a: Any) -> Any:
    m, n = a.shape[-2:]
    if m <= n:
        return a
    proj = torch.eye(m, device=a.device, dtype=a.dtype)[:, n:] - a @ a.mH[..., n:]
    return torch.cat((a, torch.linalg.householder_product(*torch.geqrf(proj))), dim=-1)


def _logm(m: Any) -> Any:
    v, vs = torch.linalg.eig(m)
    return torch.linalg.solve(vs, vs * v.unsqueeze(-2).log(), left=False).real.to(m.dtype)


def _solve_symmetric_sylvester(s: Any, c: Any) -> Any:
    v, vs = torch.linalg.eigh(s)
    c_t = vs.mH @ c @ vs
    return vs @ (c_t / (v.unsqueeze(-2) + v.unsqueeze(-1))) @ vs.mH


def exp_stiefel(u: Any, delta: Any) -> Any:
    """The Stiefel exponential at ``u`` (tall) in direction ``delta``."""
    n, p = u.shape[-2:]
    k = min(n - p, p)
    a = u.mH @ delta
    q, r = _qr_pos(delta - u @ a)
    q, r = q[..., :k], r[..., :k, :]
    w = torch.cat((torch.cat((a, -r.mH), -1), torch.cat((r, torch.zeros_like(a[..., :k, :k])), -1)), -2)
    m = torch.linalg.matrix_exp(w)
    return u @ m[..., :p, :p] + q @ m[..., p:, :p]


def log_stiefel(a: Any, b: Any, eps: float = 1e-8, max_iters: int = 100) -> Any:
    """sd-mecha's iterative Stiefel logarithm of ``b`` at ``a`` (both tall)."""
    original_shape = a.shape
    a = a.view(-1, original_shape[-2], original_shape[-1])
    b = b.view(-1, original_shape[-2], original_shape[-1])
    _, n, p = b.shape
    k = min(n - p, p)
    m = a.mH @ b
    q, n_mat = _qr_pos(b - a @ m)
    q, n_mat = q[..., :k], n_mat[..., :k, :]
    v = _orthogonal_complete(torch.cat((m, n_mat), dim=-2))
    r, sigma, r_hat_t = torch.linalg.svd(v[..., p:, p:], driver="gesvd" if v.is_cuda else None)
    q @= r
    v[..., p:, :p] = r.mH @ n_mat
    v[..., :p, p:] @= r_hat_t.mH
    p_arange = torch.arange(p, p + k, device=v.device)
    v[..., p:, p:].zero_()
    v[..., p_arange, p_arange] = sigma
    v[v.slogdet()[0] < 0, ..., -1] *= -1
    k_arange = torch.arange(k, device=v.device, dtype=torch.long)
    log = None
    for _ in range(max_iters):
        log = _logm(v)
        c = log[..., p:, p:]
        c_norm = torch.linalg.matrix_norm(c[torch.linalg.matrix_norm(c).argmax()])
        if c_norm <= eps:
            break
        s = log[..., p:, :p] @ log[..., p:, :p].mH / 12
        s[..., k_arange, k_arange] -= 0.5
        v[..., p:] @= torch.linalg.matrix_exp(_solve_symmetric_sylvester(s, c))
    return (a @ log[..., :p, :p] + q @ log[..., p:, :p]).reshape(original_shape)


class _LowRank:
    """A wide matrix's rotation: x ↦ x − x·v·vᴴ + x·u·vᴴ, with u, v tall (columns × rows)."""

    def __init__(self, u: Any, vh: Any):
        self.u, self.v = u, vh.mH

    def __call__(self, x: Any, t: float) -> Any:
        if math.isclose(t, 0.0):
            return x
        if math.isclose(t, 1.0):
            return x - x @ self.v @ self.v.mH + x @ self.u @ self.v.mH
        if math.isclose(t, -1.0):
            return x - x @ self.u @ self.u.mH + x @ self.v @ self.u.mH
        uv_log = log_stiefel(self.v, self.u)
        left = exp_stiefel(self.v, uv_log * (t + 1) / 2)
        right = exp_stiefel(self.v, uv_log * (1 - t) / 2)
        return x - x @ right @ right.mH + x @ left @ right.mH


class _FullRank:
    """A square or tall matrix's rotation: x ↦ x·Q^t."""

    def __init__(self, rotation: Any):
        self.rotation = rotation

    def __call__(self, x: Any, t: float) -> Any:
        if math.isclose(t, 0.0):
            return x
        q = self.rotation
        if math.isclose(t, 1.0):
            power = q
        elif math.isclose(t, -1.0):
            power = q.mH
        elif math.isclose(t, round(t)):
            power = torch.linalg.matrix_power(q, round(t))
        else:
            eig_v, eig_vs = torch.linalg.eig(q)
            power = (eig_vs * (eig_v ** t).unsqueeze(-2) @ eig_vs.mH).real.to(q.dtype)
        return x @ power


def orthogonal_procrustes(a: Any, b: Any, cancel_reflection: bool) -> Any:
    n, p = a.shape[-2:]
    driver = "gesvd" if a.is_cuda else None
    if n < p:
        b_q, b_r = torch.linalg.qr(b.mH)
        u, _, vh = torch.linalg.svd(a.mH @ b_r.mH, driver=driver, full_matrices=False)
        return _LowRank(u, vh @ b_q.mH)
    u, _, vh = torch.linalg.svd(a.mH @ b, driver=driver, full_matrices=False)
    if cancel_reflection:
        u[..., -1] /= torch.slogdet(u @ vh)[0]
    return _FullRank(u @ vh)


@merge_method(working_set=rotate_working_set,
              formula="(lerp(a_c, b_c·Q⁻¹, alpha))·Q^alignment + lerp(mean_a, mean_b, alignment)  (sd-mecha's)")
def sdmecha_rotate(a, b, *, alignment: float = 1.0, alpha: float = 0.0, centralization: float = 1.0,
                   stiefel_eps: float = 1e-8, stiefel_max_iters: int = 100):
    """sd-mecha's ``rotate``: a's rows rotated toward b's by an orthogonal transform.

    The tensor is a matrix (a conv with a real kernel: (out·in) × (kh·kw); else out × the rest),
    its rows centred by centralization times their mean; Q is the orthogonal Procrustes
    solution from a to b (reflection cancelled when alignment is fractional). alpha first
    interpolates a toward b brought back by Q⁻¹; then the rows are rotated by Q^alignment and
    the interpolated mean is added back. alignment = alpha = 0 gives a, both 1 give b; vectors
    and a ≈ b (equal in float16) interpolate by alpha. stiefel_eps and stiefel_max_iters are
    accepted, as sd-mecha 1.1.8 accepts them, and have no effect there either.
    """
    if math.isclose(alignment, 0.0) and math.isclose(alpha, 0.0):
        return a
    if math.isclose(alignment, 1.0) and math.isclose(alpha, 1.0):
        return b
    if a.dim() <= 1 or torch.allclose(a.half(), b.half()):
        return torch.lerp(a, b, alpha)
    is_conv = a.dim() == 4 and a.shape[-2:].numel() != 1
    shape_2d = (a.shape[:2].numel(), a.shape[2:].numel()) if is_conv else (a.shape[:1].numel(), a.shape[1:].numel())
    a_2d, b_2d = a.reshape(*shape_2d), b.reshape(*shape_2d)
    a_mean, b_mean = a_2d.mean(0) * centralization, b_2d.mean(0) * centralization
    a_2d, b_2d = a_2d - a_mean, b_2d - b_mean
    transform = orthogonal_procrustes(a_2d, b_2d, cancel_reflection=not math.isclose(alignment, round(alignment)))
    if not math.isclose(alpha, 0):
        a_2d = torch.lerp(a_2d, transform(b_2d, -1), alpha)
    a_2d = transform(a_2d, alignment)
    return (a_2d + torch.lerp(a_mean, b_mean, alignment)).reshape_as(a)
