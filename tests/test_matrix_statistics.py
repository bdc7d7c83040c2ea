"""Column sums (Total with per=), CrossTotal and Derived: float64 sums of a key laid out as a matrix, over pieces
that cut rows anywhere (columns) or hold whole rows (cross products), against plain float64
torch sums written here."""

from __future__ import annotations

import pytest
import torch

from mecha_core import CrossTotal, Derived, RowStack, Total
from mecha_core.engine import statistics
from mecha_core.method import MergeContext
from mecha_core.specs import TensorInfo


def _pieces(tensors: list[torch.Tensor], bounds: list[int]):
    """Pieces of the flattened tensors between consecutive ``bounds``."""
    info = TensorInfo(tuple(tensors[0].shape), "float32")

    def pieces():
        for a, b in zip(bounds, bounds[1:]):
            yield MergeContext("k", info, start=a, stop=b), [t.reshape(-1)[a:b] for t in tensors]

    return pieces


@pytest.mark.parametrize("bounds", [[0, 600], [0, 7, 8, 150, 151, 599, 600], list(range(0, 601, 13)) + [600]])
def test_column_sums_over_pieces_that_cut_rows_anywhere(bounds):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 15, generator=gen)
    y = torch.randn(40, 15, generator=gen)
    bounds = sorted(set(bounds))
    got = statistics.compute([Total("xy", lambda ctx, a, b: a * b, per=15), Total("x", lambda ctx, a, b: a, per=3)],
                             _pieces([x, y], bounds), x.numel())
    ref = (x * y).double().sum(dim=0)  # the float32 products, summed in float64
    assert got["xy"].dtype == torch.float64 and got["xy"].shape == (15,)
    assert torch.allclose(got["xy"], ref, rtol=1e-12, atol=1e-12)
    # 3 columns: the flat key in rows of 3
    assert torch.allclose(got["x"], x.double().reshape(-1, 3).sum(dim=0), rtol=1e-12, atol=1e-12)


def test_cross_product_over_pieces_of_whole_rows_and_derived_values_in_order():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 8, generator=gen)
    y = torch.randn(30, 8, generator=gen)
    seen = []

    def trace(stats):
        seen.append(sorted(stats))
        return torch.trace(stats["xy"])

    requests = [CrossTotal("xy", lambda ctx, a, b: a, lambda ctx, a, b: b, 8), Total("n", lambda ctx, a, b: a * 0 + 1),
                Derived("trace", trace), Derived("twice", lambda stats: 2 * stats["trace"])]
    got = statistics.compute(requests, _pieces([x, y], [0, 16, 64, 240]), x.numel())
    ref = x.double().T @ y.double()
    assert got["xy"].dtype == torch.float64
    assert torch.allclose(got["xy"], ref, rtol=1e-12, atol=1e-12)
    assert got["n"] == 240
    assert seen == [["n", "xy"]]  # derived once, after the sums
    assert float(got["twice"]) == pytest.approx(2 * float(torch.trace(ref)), rel=1e-12)


def test_a_cross_product_refuses_a_piece_that_cuts_a_row():
    x = torch.ones(10, 4)
    with pytest.raises(ValueError, match="does not hold whole rows of 4"):
        statistics.compute([CrossTotal("xx", lambda ctx, a: a, lambda ctx, a: a, 4)], _pieces([x], [0, 6, 40]), 40)


def test_column_sums_stay_within_1e_9_of_float64_where_float32_drifts():
    # 4M rows of 2 columns of values in [1, 2): a float32 sum down a column drifts by far more
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1 << 22, 2, generator=gen) + 1.0
    ref = x.double().sum(dim=0)
    bounds = list(range(0, x.numel(), (1 << 20) + 1)) + [x.numel()]
    got = statistics.compute([Total("x", lambda ctx, a: a, per=2)], _pieces([x], bounds), x.numel())
    assert float(((got["x"] - ref).abs() / ref).max()) < 1e-12


def test_a_row_stack_puts_each_pieces_rows_in_place():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, 4, generator=gen)  # rows of 12 elements
    request = RowStack("fft", lambda ctx, a: torch.fft.rfft(a.reshape(-1, 3, 4), dim=-1))
    got = statistics.compute([request], _pieces([x], [0, 24, 36, 144]), x.numel())
    assert got["fft"].shape == (12, 3, 3) and got["fft"].dtype == torch.complex64
    assert torch.allclose(got["fft"], torch.fft.rfft(x, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="does not hold whole rows"):
        statistics.compute([request], _pieces([x], [0, 20, 144]), x.numel())
