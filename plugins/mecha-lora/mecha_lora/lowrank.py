"""Rank-r factorisations of a weight difference (for extracting and re-factorising LoRAs)."""

from __future__ import annotations

from mecha_core.lazy import torch

#: Extra random directions beyond the rank; more makes the randomized SVD closer to the optimum.
OVERSAMPLE = 10
#: Power iterations; each sharpens the captured subspace when the spectrum decays slowly.
POWER_ITERATIONS = 4


def low_rank(matrix: torch.Tensor, rank: int, *, seed: int = 0, oversample: int = OVERSAMPLE,
             power_iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [m, r], down [r, n]) with up @ down ≈ the best rank-r approximation of ``matrix``.

    Randomized SVD (Halko, Martinsson, Tropp 2011) with re-orthonormalised power iterations;
    when the sketch would be at least half the matrix's smaller side, a full SVD is as cheap and
    exact. The singular values are split evenly: up = U·sqrt(S), down = sqrt(S)·Vᵀ.
    """
    m, n = matrix.shape
    rank = max(1, min(rank, m, n))
    sketch = rank + oversample
    a = matrix.to(torch.float32)
    if 2 * sketch >= min(m, n):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        gen = torch.Generator(device=a.device)
        gen.manual_seed(seed)
        q = torch.linalg.qr(a @ torch.randn(n, sketch, generator=gen, device=a.device)).Q
        for _ in range(power_iterations):
            q = torch.linalg.qr(a.T @ q).Q
            q = torch.linalg.qr(a @ q).Q
        ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ ub
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
