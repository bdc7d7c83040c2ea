"""Element-wise methods against closed forms computed in numpy (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import mecha_core
from mecha_core.errors import RecipeError

from .conftest import arrays, assert_close, near, random_model


@pytest.fixture
def trio():
    base = random_model(10)
    return base, near(base, 11, 0.2), near(base, 12, 0.2)


def test_weighted_sum_and_n_average(run, trio):
    a, b, c = trio
    out = run.call("weighted_sum", a, b, alpha=0.3)
    mean = run.call("n_average", a, b, c)
    A, B, C = arrays(a), arrays(b), arrays(c)
    for k in A:
        assert_close(out[k], 0.7 * A[k] + 0.3 * B[k], what=k)
        assert_close(mean[k], (A[k] + B[k] + C[k]) / 3, what=k)


def test_add_difference_three_inputs_and_delta_form(run, trio):
    a, b, c = trio
    three = run.call("add_difference", a, b, c, alpha=0.75)
    two = run.merge(lambda x, y, z: mecha_core.add_difference(x, mecha_core.subtract(y, z), alpha=0.75), a, b, c)
    A, B, C = arrays(a), arrays(b), arrays(c)
    for k in A:
        expected = A[k] + 0.75 * (B[k] - C[k])
        assert_close(three[k], expected, what=k)
        assert_close(two[k], expected, what=k)


def test_subtract_scale_add(run, trio):
    a, b, c = trio
    out = run.merge(lambda x, y, z: mecha_core.add(x, mecha_core.scale(mecha_core.subtract(y, z), alpha=-2.0)),
                    a, b, c)
    A, B, C = arrays(a), arrays(b), arrays(c)
    for k in A:
        assert_close(out[k], A[k] - 2.0 * (B[k] - C[k]), what=k)


def test_fallback_takes_keys_missing_from_a(run, trio):
    a, b, _ = trio
    partial = {"lin.weight": a["lin.weight"]}
    out = run.call("fallback", partial, b)
    assert sorted(out) == sorted(b)
    assert_close(out["lin.weight"], a["lin.weight"].double().numpy())
    assert_close(out["lin.bias"], b["lin.bias"].double().numpy())


def test_task_arithmetic(run, trio):
    base, a, b = trio
    c = near(base, 13, 0.2)
    out = run.call("task_arithmetic", base, a, b, c, alpha=0.4)
    T0, A, B, C = arrays(base), arrays(a), arrays(b), arrays(c)
    for k in T0:
        assert_close(out[k], T0[k] + 0.4 * ((A[k] - T0[k]) + (B[k] - T0[k]) + (C[k] - T0[k])), what=k)


def _train_difference_reference(a, b, c, alpha):
    out = np.empty_like(a)
    for i, (x, y, z) in enumerate(zip(a.ravel(), b.ravel(), c.ravel())):
        num, den = abs(y - x), abs(y - z) + abs(y - x)
        factor = 0.0 if den == 0 else 1.8 * alpha * num / den
        out.ravel()[i] = x + np.sign(y - z) * abs(y - z) * factor
    return out


def test_train_difference(run, trio):
    a, b, c = trio
    # some entries where a == b == c (0/0 must give "add nothing") and where only a == b
    for key in a:
        b[key].reshape(-1)[:3] = a[key].reshape(-1)[:3]
        c[key].reshape(-1)[:2] = a[key].reshape(-1)[:2]
    out = run.call("train_difference", a, b, c, alpha=0.6)
    A, B, C = arrays(a), arrays(b), arrays(c)
    for k in A:
        assert_close(out[k], _train_difference_reference(A[k], B[k], C[k], 0.6), what=k)
        assert np.array_equal(out[k].ravel()[:3], A[k].ravel()[:3])


def _clamp_reference(a, bounds, stiffness):
    out = np.empty_like(a)
    for i in range(a.size):
        values = sorted(b.ravel()[i] for b in bounds)
        mean = sum(values) / len(values)
        hi, lo = values[-1], values[0]
        nearest_above = min(v for v in values if v >= mean)
        nearest_below = max(v for v in values if v <= mean)
        hi = (1 - stiffness) * hi + stiffness * nearest_above
        lo = (1 - stiffness) * lo + stiffness * nearest_below
        out.ravel()[i] = min(max(a.ravel()[i], lo), hi)
    return out


@pytest.mark.parametrize("stiffness", [0.0, 0.5])
def test_clamp(run, stiffness):
    a = random_model(20, scale=2.0)
    bounds = [random_model(21 + i) for i in range(3)]
    out = run.call("clamp", a, *bounds, stiffness=stiffness)
    A = arrays(a)
    for k in A:
        ref = _clamp_reference(A[k], [arrays(b)[k] for b in bounds], stiffness)
        assert_close(out[k], ref, what=k)
    # the test data really exercises the clip: many entries of a lie outside the bounds
    assert sum((out[k] != A[k]).sum() for k in A) > 20


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
    return bits.astype(np.uint32).view(np.float32)


def test_cast_rounds_through_dtype(run):
    a = random_model(30)
    half = run.call("cast", a, dtype="float16")
    bf16 = run.call("cast", a, dtype="bfloat16")
    A = {k: v.numpy() for k, v in a.items()}
    for k in A:
        assert np.array_equal(half[k], A[k].astype(np.float16).astype(np.float64)), k
        assert np.array_equal(bf16[k], _round_to_bfloat16(A[k]).astype(np.float64)), k
        assert not np.array_equal(half[k], A[k].astype(np.float64))


def test_cast_rejects_unknown_dtype(run):
    # dtype is a Literal: refused when the recipe is built, before any file is opened
    with pytest.raises(RecipeError, match=r'^cast\(dtype="int8"\): use one of "float64", "float32", "bfloat16"'):
        mecha_core.cast(mecha_core.model("a.safetensors"), dtype="int8")


def test_task_arithmetic_with_per_model_weights(run, trio):
    base, a, b = trio
    out = run.call("task_arithmetic", base, a, b, alpha=0.5, weights=[2.0, -0.5])
    T0, A, B = arrays(base), arrays(a), arrays(b)
    for k in T0:
        assert_close(out[k], T0[k] + 0.5 * (2.0 * (A[k] - T0[k]) - 0.5 * (B[k] - T0[k])), what=k)
