"""The compiled TIES loop (``mecha_methods._native``) against the eager torch path it replaces,
bit for bit, and through the engine against the whole-tensor definition."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.kit import native
from mecha_core import MergeContext, Selection
from mecha_core.specs import TensorInfo
from mecha_core.testing import write_checkpoint
from mecha_methods import _native
from mecha_methods.sparse import _ties_in_place

from .test_methods_sparse import _torch_ties


def test_the_kernel_builds_on_this_machine():
    """Every machine the project runs on has a C compiler: a kernel that does not build here is
    a fault (the merge would silently take the slow path), not something to skip."""
    assert _native.available(), native.why_not("mecha_ties")


def _values(n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 values from a small set (many equal magnitudes), with signed zeros, subnormals
    and some large entries."""
    v = torch.randint(-8, 9, (n,), generator=gen).float() / 8
    v[torch.rand(n, generator=gen) < 0.05] = -0.0
    v[torch.rand(n, generator=gen) < 0.02] = 3e-39  # subnormal deltas
    v[torch.rand(n, generator=gen) < 0.01] *= 1e30
    return v


def _selection(delta: torch.Tensor, start: int, total: int, gen: torch.Generator, where: str) -> Selection:
    """A selection of ``delta``'s magnitudes as the statistics pass hands one to a slice: a
    threshold among them (or 0), the last tie kept before, inside or after the slice."""
    mags = delta.abs()
    threshold = 0.0 if where == "zero" else float(mags[int(torch.randint(0, delta.numel(), (1,), generator=gen))])
    last = {"before": start - 1 - int(torch.randint(0, 5, (1,), generator=gen)),
            "after": start + delta.numel() + int(torch.randint(0, 5, (1,), generator=gen)),
            "block": start + 1023,
            }.get(where, start + int(torch.randint(0, delta.numel(), (1,), generator=gen)))
    return Selection(total // 5, total, threshold, last)


def _eager(base, models, selections, start, total, vote, alpha):
    ctx = MergeContext("k", TensorInfo((total,), "float32"), start=start, stop=start + base.numel())
    stats = {f"trim{i}": s for i, s in enumerate(selections)}
    merged = _ties_in_place(base, [m.clone() for m in models], stats, ctx, vote)
    if merged is None:
        return None
    return (merged if alpha == 1 else merged.mul_(alpha)).add_(base)


@pytest.mark.parametrize("n", [1, 1000, 1024, 1025, 5000])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_the_kernel_gives_the_eager_paths_bits(n, count):
    gen = torch.Generator().manual_seed(n * 10 + count)
    start, total = 777, 777 + n + 300
    cases = itertools.product(["sum", "count"], [1.0, 0.3, -2.5], ["inside", "before", "after", "zero", "block"])
    for vote, alpha, where in cases:
        base = _values(n, gen)
        models = [base + _values(n, gen) for _ in range(count)]
        if count > 1:
            models[1][::3] = base[::3]  # zero deltas
        selections = [_selection(m - base, start, total, gen, where) for m in models]
        got = _native.ties(base, models, selections, start, vote, alpha)
        want = _eager(base, models, selections, start, total, vote, alpha)
        assert got is not None and want is not None
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (vote, alpha, where)


@pytest.mark.parametrize("vote", ["sum", "count"])
def test_a_slice_with_a_vote_that_is_not_finite_is_declined(vote):
    """As the eager path declines it (the caller then computes the definition)."""
    base = torch.zeros(3000)
    models = [torch.ones(3000), torch.ones(3000)]
    models[0][2500], models[1][2500] = float("inf"), float("-inf")
    selections = [Selection(600, 3000, 0.5, 0)] * 2
    assert _native.ties(base, models, selections, 0, vote, 1.0) is None
    assert _eager(base, models, selections, 0, 3000, vote, 1.0) is None
    models[0][2500] = models[1][2500] = 1.0
    assert _native.ties(base, models, selections, 0, vote, 1.0) is not None


def test_inputs_it_does_not_take_are_left_to_the_eager_path():
    base = torch.zeros(10)
    models = [torch.ones(10)]
    chosen = [Selection(2, 10, 0.5, 0)]
    assert _native.ties(base, models, [Selection(10, 10, None, 10)], 0, "sum", 1.0) is None  # keeps everything
    assert _native.ties(base.double(), [m.double() for m in models], chosen, 0, "sum", 1.0) is None
    assert _native.ties(torch.zeros(20)[::2], models, chosen, 0, "sum", 1.0) is None  # not contiguous
    many = [torch.ones(10)] * (_native.MAX_MODELS + 1)
    assert _native.ties(base, many, chosen * len(many), 0, "sum", 1.0) is None
    assert _native.ties(base, models, chosen, 0, "sum", 1.0) is not None


@pytest.mark.parametrize("compiled", [True, False])
def test_merges_with_and_without_the_kernel_give_the_definitions_bytes(tmp_path, monkeypatch, compiled):
    """float32 keys, whole and in slices: the kernel runs for every slice (or never, when it is
    unavailable), and the bytes are the whole-tensor definition's either way."""
    calls = []
    kernel = _native._ties_function() if compiled else None
    assert (kernel is not None) == compiled

    def counted():
        calls.append(1)
        return kernel

    monkeypatch.setattr(_native, "_ties_function", counted)
    gen = torch.Generator().manual_seed(3)
    base = _values(9000, gen)
    models = [base + _values(9000, gen) for _ in range(3)]
    paths = [mecha_core.model(write_checkpoint(tmp_path / f"m{i}.safetensors", {"w": t}))
             for i, t in enumerate([base, *models])]
    for chunk, vote in [(None, "sum"), (1000, "sum"), (4099, "count")]:
        out = tmp_path / "out.safetensors"
        calls.clear()
        mecha_core.merge(mecha_core.ties(*paths, density=0.3, vote=vote), out, chunk_elements=chunk,
                         allow_nonfinite=True)
        got = load_file(out)["w"]
        want = _torch_ties(base, models, 0.3, vote)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (chunk, vote)
        assert len(calls) == (1 if chunk is None else -(-9000 // chunk)), (chunk, calls)
