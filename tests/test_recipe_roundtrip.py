"""Round trip of random recipe graphs: ``load(dump(r)) == r`` and ``dump(load(dump(r))) == dump(r)``.

The methods come from the host's registry, so methods added to mecha-methods are covered without
editing this file. Block maps name a small fake architecture registered by a test plugin.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mecha_methods.plugin
from mecha_core import merge_method
from mecha_core.errors import RecipeError
from mecha_core.plugins import plugin_from_functions
from mecha_core import load_recipe  # the plugin host's methods
from mecha_core.recipe import CallNode, ModelNode, dump_recipe
from mecha_core.recipe.nodes import ParameterNode, parameter, walk
from mecha_core.recipe.values import blocks, classes
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import host_with, using

TOY = Architecture(
    "toy-arch",
    {"enc.0.w": KeySpec((2,), "float32", "enc", blocks=("IN00",), klass="proj"),
     "mid.w": KeySpec((2,), "float32", "core", blocks=("M00",), klass="conv"),
     "dec.0.w": KeySpec((2,), "float32", "dec", blocks=("OUT00",), klass="proj")},
    blocks=("IN00", "M00", "OUT00"), classes=("conv", "proj"))


@merge_method
def weigh(*models, weights=None):
    """A method whose hyperparameter has no annotated kind (lists and any scalar are accepted)."""
    return models[0]


TOY_PLUGIN = plugin_from_functions("toy", mecha_architectures=lambda: [TOY], mecha_merge_methods=lambda: [weigh])


def make_host():
    return host_with(mecha_methods.plugin, TOY_PLUGIN)


numbers = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=False))


@st.composite
def weight_maps(draw):
    def one():
        kind = draw(st.sampled_from(["blocks", "classes"]))
        names = TOY.blocks if kind == "blocks" else TOY.classes
        entries = draw(st.dictionaries(st.sampled_from(names), numbers, max_size=len(names)))
        default = draw(st.one_of(st.none(), numbers))
        return (blocks if kind == "blocks" else classes)(TOY.name, default, **entries)

    result = one()
    for _ in range(draw(st.integers(0, 2))):
        result = result | one()
    return result


def hyper_values(kind):
    """Values of the right kind for a hyperparameter (block maps where numbers are accepted)."""
    if kind is float:
        return st.one_of(numbers, weight_maps())
    if kind is int:
        return st.one_of(st.integers(-10**6, 10**6), weight_maps())
    if kind is bool:
        return st.booleans()
    if kind is str:
        return st.text(max_size=12)
    return st.one_of(st.lists(numbers, max_size=4).map(tuple), st.none(), st.booleans(), numbers,
                     st.text(max_size=8), weight_maps())


paths = st.one_of(st.sampled_from(["a.safetensors", "models/b.safetensors", "ghostmix_v20Bakedvae",
                                   "true.safetensors", "dir with space/c d.ckpt", "x/a.safetensors"]),
                  st.text(min_size=1, max_size=16))


@st.composite
def models(draw):
    return ModelNode(draw(paths), draw(st.sampled_from([None, "toy-arch", "sd1-ldm"])),
                     draw(st.sampled_from([None, None, "base", "delta"])))


@st.composite
def recipes(draw, methods):
    pool = [draw(models()) for _ in range(draw(st.integers(1, 4)))]
    hyper_params: list[ParameterNode] = []
    for i in range(draw(st.integers(0, 2))):
        p = parameter(f"p{i}", draw(st.sampled_from([None, "weight", "delta"])))
        (pool if draw(st.booleans()) else hyper_params).append(p)
    built = []
    for _ in range(draw(st.integers(1, 8))):
        method = draw(st.sampled_from(methods))
        fixed = [i for i in method.inputs if not i.variadic]
        low = sum(1 for i in fixed if not i.optional)
        high = len(fixed) + (3 if method.variadic else 0)
        n = draw(st.integers(low, high))
        # prefer recent results, so graphs get deep and share sub-results
        args = [pool[-1 - draw(st.integers(0, min(len(pool) - 1, 4)))] for _ in range(n)]
        kwargs = {}
        for h in method.hyperparameters:
            if draw(st.booleans()):
                kwargs[h.name] = (draw(st.sampled_from(hyper_params)) if hyper_params and draw(st.booleans())
                                  else draw(hyper_values(h.kind)))
        try:
            node = method(*args, **kwargs)
        except RecipeError:
            continue  # merge spaces that do not fit: a recipe mecha refuses to build
        pool.append(node)
        built.append(node)
    return built[-1] if built else pool[-1]


def check_round_trip(recipe):
    text = dump_recipe(recipe)
    again = load_recipe(text)
    assert again == recipe
    assert dump_recipe(again) == text
    assert text.startswith("mecha 1\n") and text.endswith("\n")
    assert len(text.split("\n")) == 2 + sum(1 for _ in walk_named(recipe))


def walk_named(recipe):
    return [n for n in walk(recipe) if not type(n).__name__ == "LiteralNode"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_recipe_graphs_round_trip_byte_for_byte(data):
    with using(make_host()) as host:
        methods = sorted(host.merge_methods.values(), key=lambda m: m.name)
        recipe = data.draw(recipes(methods))
        check_round_trip(recipe)


def every_method_call(host, method):
    """One call of ``method`` with every hyperparameter given, inputs of unknown space."""
    fixed = [i for i in method.inputs if not i.variadic]
    n = len(fixed) + (2 if method.variadic else 0)
    args = [ModelNode(f"m{i}.safetensors") for i in range(n)]
    samples = {float: 0.25, int: 3, bool: True, str: "text", None: blocks(TOY.name, 0.5, IN00=1.0)}
    # a hyperparameter with fixed choices takes its last one (not its default, so it is printed)
    kwargs = {h.name: h.choices[-1] if h.choices else samples.get(h.kind, 0.5) for h in method.hyperparameters}
    return method(*args, **kwargs)


def test_every_registered_method_round_trips_with_all_hyperparameters():
    host = make_host()
    with using(host):
        names = host.merge_methods.names()
        assert {"weighted_sum", "add_difference", "subtract", "fallback"} <= set(names)
        for name in names:
            method = host.method(name)
            try:
                recipe = every_method_call(host, method)
            except RecipeError as exc:  # a method may refuse a sample value; then try its defaults
                recipe = method(*[ModelNode(f"m{i}") for i, _ in enumerate(
                    [i for i in method.inputs if not i.variadic] or [None])])
                assert str(exc)
            text = dump_recipe(recipe)
            assert f"{name}(" in text
            check_round_trip(recipe)


def test_shared_sub_results_and_parameters_survive_the_round_trip():
    with using(make_host()) as host:
        a, b = ModelNode("a.safetensors"), ModelNode("b.safetensors")
        k = parameter("k")
        d = host.method("subtract")(a, b)
        r = host.method("weighted_sum")(host.method("add")(a, d), host.method("add")(b, d), alpha=k)
        text = dump_recipe(r)
        assert text.count("subtract(") == 1 and text.count('parameter("k")') == 1
        again = load_recipe(text)
        assert again == r
        # the shared delta is one node in the parsed graph, as in the original
        assert again.args[0].args[1] is again.args[1].args[1]
        assert isinstance(again, CallNode)
