"""Statistics that depend on others (``Then``) and sums per column (``Total(per=)``), over slices
of any size: the same values as plain torch on the whole tensor."""

from __future__ import annotations

import pytest
import torch

from mecha_core import Then, TopK, Total
from mecha_core.engine import statistics
from mecha_core.method import MergeContext
from mecha_core.specs import TensorInfo


def _pieces(tensor: torch.Tensor, size: int, calls: list):
    info = TensorInfo(tuple(tensor.shape), "float32")

    def pieces():
        calls.append(1)
        for a in range(0, tensor.numel(), size):
            b = min(a + size, tensor.numel())
            yield MergeContext("k", info, start=a, stop=b), [tensor.reshape(-1)[a:b]]

    return pieces


@pytest.mark.parametrize("size", [7, 64, 1000])
def test_then_sums_what_a_selection_kept_and_picks_k_from_a_total(size):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(-5, 6, (30, 20), generator=gen) / 4).float()  # few values: ties at the bound
    k = 150

    def kept(got):
        return [Total("kept", lambda ctx, v: v.abs() * got["top"].mask(v.abs(), ctx)),
                Then(lambda more: [TopK("top_pos", lambda ctx, v: v.clamp(min=0), int(more["positive"]))])]

    requests = [TopK("top", lambda ctx, v: v, k), Total("positive", lambda ctx, v: (v > 0).float()), Then(kept)]
    calls: list = []
    got = statistics.compute(requests, _pieces(x, size, calls), x.numel())
    order = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices
    assert got["kept"] == pytest.approx(float(x.reshape(-1).abs()[order[:k]].double().sum()), abs=0)
    positive = int((x > 0).sum())
    assert got["positive"] == positive
    ctx = MergeContext("k", TensorInfo((30, 20), "float32"))
    mask = got["top_pos"].mask(x.clamp(min=0), ctx)
    want = torch.zeros(x.numel(), dtype=torch.bool)
    want[torch.sort(x.reshape(-1).clamp(min=0), descending=True, stable=True).indices[:positive]] = True
    assert torch.equal(mask.reshape(-1), want)
    assert len(calls) >= 3  # the dependent statistics took passes of their own


@pytest.mark.parametrize("size", [7, 20, 333])
def test_sums_per_column(size):
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    got = statistics.compute([Total("cols", lambda ctx, v: v * v, per=20)], _pieces(x, size, []), x.numel())
    assert got["cols"].dtype == torch.float64 and got["cols"].shape == (20,)
    torch.testing.assert_close(got["cols"], (x * x).double().sum(dim=0), rtol=1e-12, atol=0)
