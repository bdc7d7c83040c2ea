"""mecha_core.engine.kernels: each C kernel counts what its eager torch twin counts."""

from __future__ import annotations

import pytest
import torch

from mecha_core import native
from mecha_core.engine import kernels


def _expected(bits: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    # int64 arithmetic: no bit pattern minus any offset overflows here
    bins = (bits.long() - offset).clamp(0, size + 1)
    return torch.bincount(bins, minlength=size + 2).to(torch.int32)


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv("MECHA_NATIVE", raising=False)


def test_the_window_count_kernel_builds_on_this_machine():
    # CI machines have a C compiler: the kernel must be there, not silently replaced by eager torch
    assert kernels.window_count(torch.zeros(3, dtype=torch.int32), 0, 4, torch.zeros(6, dtype=torch.int32)), \
        native.why_not("mecha_window_count")


@pytest.mark.parametrize("offset,size", [(0, 1), (-1, 7), (1_000_000_000, 4096), (0x7F7FFFFF - 3, 16),
                                         (-2**31, 255), (0x7FFFFFFE, 1)])
@pytest.mark.parametrize("n", [1, 17, 4099])
def test_window_counts_match_a_bincount_of_the_clamped_bins(offset, size, n):
    generator = torch.Generator().manual_seed(n * 31 + size)
    spread = torch.randint(-size - 3, size + 4, (n,), generator=generator, dtype=torch.int64) + offset
    wild = torch.randint(-2**31, 2**31, (n,), generator=generator, dtype=torch.int64)
    bits = torch.where(torch.rand(n, generator=generator) < 0.8, spread, wild)
    edges = torch.tensor([offset, offset + 1, offset + size, offset + size + 1, 0x7FFFFFFF, -2**31])
    bits = torch.cat([bits, edges])[:max(n, 6)].clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()
    hist = torch.full((size + 2,), 5, dtype=torch.int32)  # counts add to what is there
    assert kernels.window_count(bits, offset, size, hist)
    assert torch.equal(hist, _expected(bits, offset, size) + 5)


def test_window_count_declines_what_it_cannot_count():
    bits, hist = torch.zeros(8, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
    assert not kernels.window_count(bits.long(), 0, 4, hist)
    assert not kernels.window_count(bits[::2], 0, 4, hist)
    assert not kernels.window_count(bits, 0, 5, hist)  # hist is not size + 2 counters
    assert torch.equal(hist, torch.zeros(6, dtype=torch.int32))


def test_window_count_steps_aside_when_native_kernels_are_off(monkeypatch):
    monkeypatch.setenv("MECHA_NATIVE", "0")
    monkeypatch.setattr(native, "_functions", {})
    hist = torch.zeros(6, dtype=torch.int32)
    assert not kernels.window_count(torch.ones(4, dtype=torch.int32), 0, 4, hist)
    assert torch.equal(hist, torch.zeros(6, dtype=torch.int32))
