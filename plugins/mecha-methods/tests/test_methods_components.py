"""pick_component / omit_component with a small stand-in architecture, and their errors."""

from __future__ import annotations

import mecha_methods.plugin
import numpy as np
import pytest

import mecha_core
from mecha_core.errors import MergeError, MergeSpaceError
from mecha_core.testing import plugin_from_functions
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import using

from .conftest import SHAPES, Runner, arrays, near, random_model

COMPONENT = {"lin.weight": "unet", "lin.bias": "unet", "conv.weight": "vae"}
BLOCK = {"lin.weight": "IN", "lin.bias": "OUT", "conv.weight": "OUT"}


def _toy():
    keys = {k: KeySpec(SHAPES[k], "float32", COMPONENT[k], blocks=(BLOCK[k],)) for k in SHAPES}
    return [Architecture("toy", keys, blocks=("IN", "OUT"), component_aliases={"first_stage": "vae"})]


TOY = plugin_from_functions("toy_arch", mecha_architectures=_toy)


@pytest.fixture
def run_toy(tmp_path):
    with using(mecha_methods.plugin, TOY):
        yield Runner(tmp_path)


@pytest.mark.parametrize("component", ["vae", "first_stage"])
def test_pick_and_omit_component_between_two_models(run_toy, component):
    a, b = random_model(1), random_model(2)
    picked = run_toy.call("pick_component", a, b, component=component)
    omitted = run_toy.call("omit_component", a, b, component=component)
    A, B = arrays(a), arrays(b)
    for k, comp in COMPONENT.items():
        np.testing.assert_array_equal(picked[k], A[k] if comp == "vae" else B[k])
        np.testing.assert_array_equal(omitted[k], B[k] if comp == "vae" else A[k])


def test_picked_delta_leaves_other_components_alone(run_toy):
    base = random_model(3)
    tuned = near(base, 4, 0.5)
    target = random_model(5)
    out = run_toy.merge(lambda t, x, b: mecha_core.add(t, mecha_core.pick_component(
        mecha_core.subtract(x, b), component="unet")), target, tuned, base)
    T, X, B = arrays(target), arrays(tuned), arrays(base)
    for k, comp in COMPONENT.items():
        expected = T[k] + (X[k] - B[k]) if comp == "unet" else T[k]
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-6)


def test_pick_component_of_weights_needs_a_second_input(run_toy):
    with pytest.raises(MergeSpaceError, match="pick_component: without a second input, a must be a delta"):
        run_toy.call("pick_component", random_model(1), component="vae")


def test_unknown_component_lists_the_known_ones(run_toy):
    with pytest.raises(MergeError, match="toy has no component 'text'; it has unet, vae"):
        run_toy.call("omit_component", random_model(1), random_model(2), component="text")
    with pytest.raises(MergeError, match='give component="NAME"'):
        run_toy.call("pick_component", random_model(1), random_model(2))
    assert not list(run_toy.folder.glob("out*"))


def test_component_methods_need_an_architecture(run):
    with pytest.raises(MergeError, match="no architecture was detected"):
        run.call("pick_component", random_model(1), random_model(2), component="vae")


def test_hyperparameters_take_block_maps_resolved_per_key(run_toy):
    base = {k: v * 0 for k, v in random_model(1).items()}
    model = random_model(2)
    density = mecha_core.blocks("toy", default=0.5, OUT=0.25)
    out = run_toy.call("ties", base, model, density=density)
    mix = run_toy.call("weighted_sum", base, model, alpha=mecha_core.blocks("toy", IN=0.2, OUT=0.7))
    M = arrays(model)
    for k in M:
        fraction = 0.5 if BLOCK[k] == "IN" else 0.25
        assert np.count_nonzero(out[k]) == int(fraction * M[k].size), k
        np.testing.assert_allclose(mix[k], M[k] * (0.2 if BLOCK[k] == "IN" else 0.7), rtol=1e-6)
