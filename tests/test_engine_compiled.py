"""The compiled plan and the checks around every method call.

- steps carry their method, inputs and hyperparameters bound at plan time (block/class maps
  resolved per key through the host, aliases included), so the runner needs neither the recipe
  nor the plugin host;
- ``MergeContext.architecture`` is the architecture itself;
- what a method returns is checked (dtype, shape, device), a write into an input is refused
  without crashing, and a method's exception is one line naming plugin, method, key and file;
- plan-time errors about a call point at the recipe line the call or its literal came from;
- the plugins a merge relied on are recorded by the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.engine.evaluate import Evaluator
from mecha_core.engine.plan import make_plan
from mecha_core.errors import MergeError, PlanError, PluginCodeError, RecipeError
from mecha_core.plugins import plugin_from_functions
from mecha_core.recipe.nodes import CallNode, LiteralNode, Location, call
from mecha_core.recipe.values import WeightMap
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import host_with, using, write_checkpoint

# A toy layout: "both" sits in two blocks (a map gives it the mean of their values).
TOY = Architecture(
    "toy-arch",
    keys={"in.w": KeySpec((4,), "float32", "net", blocks=("IN",), klass="lin"),
          "mid.w": KeySpec((4,), "float32", "net", blocks=("MID",), klass="conv"),
          "both.w": KeySpec((4,), "float32", "net", blocks=("IN", "MID"), klass="lin")},
    blocks=("IN", "MID"), classes=("lin", "conv"), aliases=("toy",))


@mecha.merge_method
def blend(a, b, *, alpha: float = 0.5, steps: int = 1, ctx=None):
    """(1 - alpha) a + alpha b + steps (steps shows the int hyperparameter)."""
    seen.append((ctx.key, alpha, steps, ctx.architecture))
    return a * (1 - alpha) + b * alpha + steps


seen: list = []


def _toy_host(*more):
    toy = plugin_from_functions("toy", mecha_architectures=lambda: [TOY], mecha_merge_methods=lambda: [blend])
    return host_with(mecha_methods.plugin, toy, *more, names=["methods", "toy", *[m.__name__ for m in more]])


def _toy_models(tmp_path):
    a = {k: torch.full((4,), 1.0 + i) for i, k in enumerate(TOY.keys)}
    b = {k: torch.full((4,), 10.0 + i) for i, k in enumerate(TOY.keys)}
    return (write_checkpoint(tmp_path / "a.safetensors", a), write_checkpoint(tmp_path / "b.safetensors", b), a, b)


def test_maps_are_resolved_per_key_at_plan_time_through_an_alias(tmp_path):
    pa, pb, a, b = _toy_models(tmp_path)
    # built directly, with the alias as written (recipes no longer canonicalise it)
    alpha = WeightMap("toy", "blocks", (("IN", 0.25), ("MID", 0.75)), default=0.5)
    steps = WeightMap("toy", "blocks", (("IN", 2), ("MID", 5)), default=1)
    with using(_toy_host()) as host:
        recipe = call(blend, (mecha.model(pa), mecha.model(pb)), {"alpha": alpha, "steps": steps})
        with make_plan(recipe, host=host) as plan:
            step = plan.steps[-1]
            assert step.method is blend and step.provider == "toy"
            bound = {k: step.hyper.for_key(k) for k in TOY.keys}
    # independent: a key's value is its block's; in two blocks, their mean (int rounded half to even)
    assert bound["in.w"] == {"alpha": 0.25, "steps": 2}
    assert bound["mid.w"] == {"alpha": 0.75, "steps": 5}
    assert bound["both.w"] == {"alpha": 0.5, "steps": 4}  # (2 + 5) / 2 = 3.5 -> 4
    assert isinstance(bound["both.w"]["steps"], int)


def test_the_runner_needs_neither_recipe_nodes_nor_the_host(tmp_path):
    pa, pb, a, b = _toy_models(tmp_path)
    seen.clear()
    with using(_toy_host()) as host:
        recipe = blend(mecha.model(pa), mecha.model(pb), alpha=mecha.blocks("toy-arch", IN=0.25, default=0.5))
        plan = make_plan(recipe, host=host)
    with plan:
        arch = plan.architecture
        for step in plan.steps:
            step.node = None  # anything reading the recipe now fails
        plan.root = plan.host = None
        evaluator = Evaluator(plan)
        got = {k: evaluator.evaluate(k) for k in TOY.keys}
    for k in TOY.keys:
        w = 0.25 if "IN" in TOY.keys[k].blocks else 0.5  # only the map's entries are averaged
        assert torch.allclose(got[k], a[k] * (1 - w) + b[k] * w + 1), k
    # the context carries the architecture object itself
    assert len(seen) == 3 and all(s[3] is arch for s in seen) and arch is host.architecture("toy")


def test_int_hyperparameter_map_mean_is_rounded_in_the_merge(tmp_path):
    pa, pb, a, b = _toy_models(tmp_path)
    with using(_toy_host()):
        recipe = blend(mecha.model(pa), mecha.model(pb), alpha=0.0,
                       steps=mecha.blocks("toy-arch", IN=2, MID=3))
        out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors"))
    assert torch.equal(out["in.w"], a["in.w"] + 2)
    assert torch.equal(out["mid.w"], a["mid.w"] + 3)
    assert torch.equal(out["both.w"], a["both.w"] + 2)  # 2.5 rounds half to even


def test_pick_component_reads_the_architecture_from_the_context(tmp_path):
    pa, pb, a, b = _toy_models(tmp_path)
    with using(_toy_host()):
        out = load_file(mecha.merge(mecha.pick_component(mecha.model(pa), mecha.model(pb), component="net"),
                                    tmp_path / "o.safetensors"))
    assert all(torch.equal(out[k], a[k]) for k in TOY.keys)


# -- plan-time errors point at the recipe line ------------------------------------------------
def test_an_error_about_a_literal_names_its_recipe_line(tmp_path):
    pa, pb, _, _ = _toy_models(tmp_path)
    bad = LiteralNode(WeightMap("toy-arch", "blocks", (("NOPE", 0.7),)), where=Location("recipe.mecha", 3, 18))
    recipe = CallNode(blend, (mecha.model(pa), mecha.model(pb)), (("alpha", bad),),
                      where=Location("recipe.mecha", 3, 1))
    with using(_toy_host()):
        with pytest.raises(RecipeError) as err:
            mecha.merge(recipe, tmp_path / "o.safetensors")
    assert str(err.value).startswith("recipe.mecha:3:18: blend(alpha=...): toy-arch has no block 'NOPE'")
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_an_error_about_a_call_names_its_recipe_line(tmp_path):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2, 3)})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(3, 2)})
    with using(_toy_host()) as host:
        method = host.method("weighted_sum")
        recipe = CallNode(method, (mecha.model(pa), mecha.model(pb)), (), where=Location("r.mecha", 7, 5))
        with pytest.raises(PlanError, match=r"^r\.mecha:7:5: key 'w' has shape \[2, 3\]"):
            mecha.merge(recipe, tmp_path / "o.safetensors")
        # a map of an architecture the keys are not of, written as a literal without a line
        other = CallNode(method, (mecha.model(pa), mecha.model(pa)),
                         (("alpha", LiteralNode(WeightMap("toy", "blocks", (), 0.5))),),
                         where=Location("r.mecha", 2, 1))
        with pytest.raises(PlanError, match=r"^r\.mecha:2:1: weighted_sum\(alpha=\.\.\.\): the map names toy-arch"):
            mecha.merge(other, tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


# -- method results ---------------------------------------------------------------------------
@mecha.merge_method
def returns_complex(a):
    """a as complex numbers."""
    return torch.complex(a, a)


@mecha.merge_method
def returns_int(a):
    """a as int64."""
    return (a * 3).to(torch.int64)


@mecha.merge_method
def returns_bool(a):
    """a > 0."""
    return a > 0


@mecha.merge_method
def returns_flat(a):
    """a, flattened."""
    return a.reshape(-1)


@mecha.merge_method
def returns_meta(a):
    """a on the meta device."""
    return a.to("meta")


BAD_RESULTS = {
    "returns_complex": "a complex64 tensor; a method must return floating-point values",
    "returns_int": "a int64 tensor; a method must return floating-point values",
    "returns_bool": "a bool tensor; a method must return floating-point values",
    "returns_flat": r"shape \[6\], expected \[2, 3\]",
    "returns_meta": "a tensor on meta, expected cpu",
}


@pytest.mark.parametrize("name", sorted(BAD_RESULTS))
def test_a_wrong_result_is_one_line_naming_method_and_key(tmp_path, name):
    plugin = plugin_from_functions("bad", mecha_merge_methods=lambda: [returns_complex, returns_int, returns_bool,
                                                                          returns_flat, returns_meta])
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.randn(2, 3)})
    with using(plugin):
        with pytest.raises(MergeError, match=rf"^key 'w': method '{name}' returned {BAD_RESULTS[name]}$"):
            mecha.merge(getattr(mecha, name)(mecha.model(pa)), tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


IN_PLACE = """
import hashlib, json, os, sys
import torch
import mecha_core as mecha
from mecha_core.plugins import plugin_from_functions
from mecha_core.testing import using

@mecha.merge_method
def doubles_in_place(a, *models):
    \"\"\"Writes into its input (a bug).\"\"\"
    (a if {which!r} == "a" else models[0]).mul_(2)
    return a

path, other, out = sys.argv[1:]
result = {{}}
with using(plugin_from_functions("inplace", mecha_merge_methods=lambda: [doubles_in_place])):
    try:
        mecha.merge(doubles_in_place(mecha.model(path), mecha.model(other)), out, chunk_elements={chunk})
    except mecha.MechaError as exc:
        result["error"] = str(exc)
print(json.dumps(result))
"""


@pytest.mark.parametrize("dtype,which,chunk", [(torch.float32, "a", 0), (torch.float32, "models", 100),
                                               (torch.float16, "a", 0)],
                         ids=["float32-whole", "float32-sliced-variadic", "float16-converted"])
def test_a_method_writing_into_its_input_is_refused_and_nothing_crashes(tmp_path, dtype, which, chunk):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.arange(1000, dtype=torch.float32).to(dtype)})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(1000, dtype=dtype)})
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (pa, pb)}
    out = tmp_path / "o.safetensors"
    script = IN_PLACE.format(which=which, chunk=chunk or None)
    done = subprocess.run([sys.executable, "-c", script, pa, pb, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # a segfault would be -11
    error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    name = "a" if which == "a" else "models[0]"
    assert error == (f"key 'w': method 'doubles_in_place' modified its input '{name}' in place; "
                     f"methods must return a new tensor")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (pa, pb)}


# -- plugin failures --------------------------------------------------------------------------
@mecha.merge_method
def exits(a):
    """Calls sys.exit (a plugin bug)."""
    sys.exit(3)


@mecha.merge_method
def interrupted(a):
    """Ctrl-C while a method runs."""
    raise KeyboardInterrupt


@mecha.merge_method
def raises_multiline(a, b):
    """Raises an exception whose text spans lines."""
    raise RuntimeError("first line\nsecond line")


def _failing_host():
    return host_with(plugin_from_functions("flaky", mecha_merge_methods=lambda: [exits, interrupted, raises_multiline]),
                     names=["flaky"])


def test_system_exit_in_a_method_is_one_line_naming_plugin_method_key_and_file(tmp_path):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    with using(_failing_host()):
        with pytest.raises(PluginCodeError) as err:
            mecha.merge(exits(mecha.model(pa)), tmp_path / "o.safetensors")
    assert str(err.value) == "plugin 'flaky': method 'exits' failed on key 'w' (file a.safetensors): SystemExit: 3"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_a_multiline_exception_becomes_one_line_naming_both_files(tmp_path):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    with using(_failing_host()):
        with pytest.raises(PluginCodeError) as err:
            mecha.merge(raises_multiline(mecha.model(pa), mecha.model(pb)), tmp_path / "o.safetensors")
    assert str(err.value) == ("plugin 'flaky': method 'raises_multiline' failed on key 'w' "
                              "(files a.safetensors, b.safetensors): RuntimeError: first line second line")


def test_keyboard_interrupt_in_a_method_still_interrupts(tmp_path):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    with using(_failing_host()):
        with pytest.raises(KeyboardInterrupt):
            mecha.merge(interrupted(mecha.model(pa)), tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


# -- provenance -------------------------------------------------------------------------------
def test_the_plan_records_the_plugins_each_step_used(tmp_path):
    pa, pb, _, _ = _toy_models(tmp_path)
    delta = write_checkpoint(tmp_path / "d.safetensors", {"scaled.in.w": torch.ones(4)})
    from mecha_core.specs import ConvertedKey, Converter, ModelType

    def plan_scaled(header):
        return {k.removeprefix("scaled."): ConvertedKey(info, (k,), lambda t, k=k: t[k] * 2)
                for k, info in header.items()}

    scaled = plugin_from_functions(
        "scaled",
        mecha_model_types=lambda: [ModelType("scaled", "delta", detect=lambda keys: bool(keys) and all(
            k.startswith("scaled.") for k in keys))],
        mecha_converters=lambda: [Converter("scaled-to-delta", None, "scaled", "toy-arch", "delta", plan_scaled)])
    with using(_toy_host(scaled)) as host:
        weights = mecha.weighted_sum(mecha.model(pa), mecha.model(pb))
        recipe = mecha.add_difference(weights, mecha.model(delta), alpha=1.0)
        with make_plan(recipe, host=host, options=mecha_options(allow_missing=True)) as plan:
            by_kind = {getattr(s.method, "name", None) or os.path.basename(s.source.path): s.plugins
                       for s in plan.steps}
            recorded = plan.plugins_used()
        out = mecha.merge(recipe, tmp_path / "o.safetensors", allow_missing=True)
    assert by_kind == {"a.safetensors": {"toy"}, "b.safetensors": {"toy"}, "d.safetensors": {"scaled", "toy"},
                       "weighted_sum": {"methods"}, "add_difference": {"methods"}}
    assert set(recorded) == {"methods", "scaled", "toy"}
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["mecha_plugins"]) == recorded


def mecha_options(**kwargs):
    from mecha_core.engine.plan import MergeOptions

    return MergeOptions(**kwargs)
