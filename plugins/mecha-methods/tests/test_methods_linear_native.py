"""The compiled weighted-sum and add-difference loops (``mecha_methods._linear_native``) against
the eager torch expressions they replace, bit for bit, and through a merge with and without them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.kit import native
from mecha_core.testing import write_checkpoint
from mecha_methods import _linear_native
from mecha_methods.basic import weighted_sum

ALPHAS = [0.5, 0.3, 1 / 3, 0.7, 0.1, 0, 1, 2, -0.25, 1.5, 1e-8, 0.9999999]


def test_the_kernels_build_on_this_machine():
    """Every machine the project runs on has a C compiler: a kernel that does not build here is
    a fault (merges would silently take the slow path), not something to skip."""
    assert _linear_native.available(), native.why_not("mecha_linear")


def _values(n: int, seed: int, special: bool = False) -> torch.Tensor:
    """float32 values over many scales, with signed zeros, subnormals and values whose products
    overflow; with ``special``, infinities and NaN too."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    picks = torch.rand(n, generator=gen)
    v[picks < 0.02] = -0.0
    v[(picks >= 0.02) & (picks < 0.04)] = 0.0
    v[(picks >= 0.04) & (picks < 0.06)] = 3e-39 * torch.sign(v[(picks >= 0.04) & (picks < 0.06)])
    v[(picks >= 0.09) & (picks < 0.10)] = 3e38
    if special:
        v[(picks >= 0.06) & (picks < 0.07)] = float("inf")
        v[(picks >= 0.07) & (picks < 0.08)] = -float("inf")
        v[(picks >= 0.08) & (picks < 0.09)] = float("nan")
    return v


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _check(got, expected) -> None:
    """The kernel's result is the eager one's bits; a result with NaN in it is declined (which
    NaN an operation passes on is the build's choice, so only torch gives torch's)."""
    if torch.isnan(expected).any():
        assert got is None
    else:
        assert got is not None
        assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [0, 1, 7, 4099, 100_003])
def test_weighted_sum_gives_the_eager_expressions_bits(n, alpha):
    a, b = _values(n, 1), _values(n, 2)
    expected = a * (1 - alpha) + b * alpha  # the eager definition, in torch's float32 arithmetic
    _check(_linear_native.weighted_sum(a, b, alpha), expected)
    assert torch.equal(_bits(weighted_sum.function(a, b, alpha=alpha)), _bits(expected))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("with_c", [True, False])
def test_add_difference_gives_the_eager_expressions_bits(alpha, with_c):
    n = 100_003
    a, b, c = _values(n, 3), _values(n, 4), _values(n, 5)
    expected = (b - c) * alpha + a if with_c else b * alpha + a
    _check(_linear_native.add_difference(a, b, c if with_c else None, alpha), expected)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_the_usual_slice_takes_the_kernel(alpha):
    """Finite values of ordinary size: no result is NaN, every call is the kernel's."""
    a, b, c = (torch.randn(70_001, generator=torch.Generator().manual_seed(s)) for s in (6, 7, 8))
    _check(_linear_native.weighted_sum(a, b, alpha), a * (1 - alpha) + b * alpha)
    _check(_linear_native.add_difference(a, b, c, alpha), (b - c) * alpha + a)
    assert _linear_native.weighted_sum(a, b, alpha) is not None
    assert _linear_native.add_difference(a, b, c, alpha) is not None


@pytest.mark.parametrize("alpha", [0.5, 0, 1, 2])
def test_a_slice_with_a_nan_result_is_left_to_torch(alpha):
    """Infinities and NaN: where some result is NaN the kernel declines, and the method's own
    answer is then torch's, bits and all."""
    a, b, c = _values(4099, 11, special=True), _values(4099, 12, special=True), _values(4099, 13, special=True)
    expected = a * (1 - alpha) + b * alpha
    assert torch.isnan(expected).any()
    assert _linear_native.weighted_sum(a, b, alpha) is None
    assert _linear_native.add_difference(a, b, c, alpha) is None
    assert torch.equal(_bits(weighted_sum.function(a, b, alpha=alpha)), _bits(expected))


def test_a_coefficient_rounds_to_float32_first():
    """torch multiplies by the float32 nearest the Python number, not by the double: the kernel
    does too, on values where the two differ (x · 0.1 in double, rounded once, is not
    x · float32(0.1) for some x)."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(9))
    got = _linear_native.add_difference(torch.zeros_like(x), x, None, 0.1)
    by_float32 = x * torch.tensor(0.1, dtype=torch.float32) + 0.0
    in_double = (x.double() * 0.1).float()
    assert (by_float32 != in_double).sum() > 10  # the two readings part on these values
    assert torch.equal(_bits(got), _bits(by_float32))


@pytest.mark.parametrize("case", ["float64", "float16", "broadcast", "strided", "huge alpha", "bool alpha",
                                  "tensor alpha", "not a tensor"])
def test_inputs_it_does_not_take_are_left_to_the_eager_path(case):
    a, b = torch.ones(8), torch.full((8,), 3.0)
    alpha = 0.5
    if case == "float64":
        a = a.double()
    elif case == "float16":
        b = b.half()
    elif case == "broadcast":
        b = torch.ones(1)
    elif case == "strided":
        b = torch.ones(16)[::2]
    elif case == "huge alpha":
        alpha = 1e300
    elif case == "bool alpha":
        alpha = True
    elif case == "tensor alpha":
        alpha = torch.tensor(0.5)
    else:
        b = 3.0
    assert _linear_native.weighted_sum(a, b, alpha) is None
    assert _linear_native.add_difference(a, b, None, alpha) is None


def test_native_off_leaves_every_call_to_the_eager_path(monkeypatch):
    monkeypatch.setattr(_linear_native, "_kernels", lambda: None)
    assert _linear_native.weighted_sum(torch.ones(4), torch.ones(4), 0.5) is None
    assert _linear_native.add_difference(torch.ones(4), torch.ones(4), None, 0.5) is None
    assert not _linear_native.available()


@pytest.mark.parametrize("compiled", [True, False])
def test_merges_with_and_without_the_kernels_give_the_same_bytes(tmp_path, monkeypatch, compiled):
    """fp16 checkpoints through the engine: weighted sum and add-difference against the
    definition computed here in float32 and rounded once to float16."""
    calls = []
    kernels = _linear_native._kernels
    monkeypatch.setattr(_linear_native, "_kernels", lambda: (calls.append(1), kernels() if compiled else None)[1])
    tensors = [{"w": _values(5000, 10 + i).clamp(-2e4, 2e4).reshape(50, 100).half(),
                "bias": _values(100, 20 + i).clamp(-2e4, 2e4).half()} for i in range(3)]
    paths = []
    for i, t in enumerate(tensors):
        paths.append(tmp_path / f"m{i}.safetensors")
        write_checkpoint(paths[-1], t)
    m = [mecha_core.model(str(p)) for p in paths]
    mecha_core.merge(mecha_core.weighted_sum(m[0], m[1], alpha=0.3), str(tmp_path / "ws.safetensors"))
    mecha_core.merge(mecha_core.add_difference(m[0], m[1], m[2], alpha=0.7), str(tmp_path / "ad.safetensors"))
    ws, ad = load_file(tmp_path / "ws.safetensors"), load_file(tmp_path / "ad.safetensors")
    for key in ("w", "bias"):
        a, b, c = (t[key].float() for t in tensors)
        assert torch.equal(ws[key].view(torch.int16), (a * (1 - 0.3) + b * 0.3).half().view(torch.int16))
        assert torch.equal(ad[key].view(torch.int16), ((b - c) * 0.7 + a).half().view(torch.int16))
    assert calls, "the merge did not reach the kernels' entry point"
