"""Large and deep recipes: parsing and printing are linear, and no graph operation recurses
once per level (a deep chain never hits Python's recursion limit).

Times are compared as a ratio measured in the same run, so a slow or busy machine does not fail
them: the same work on a tenth of the nodes, done just before, must take more than a thirtieth of
the time (linear work: about a tenth; the quadratic behaviour guarded against, a 10^5-node recipe
that took minutes to print before: a hundredth)."""

from __future__ import annotations

import sys
import time

import pytest

import mecha_core
import mecha_methods.plugin
from mecha_core.errors import RecipeError
from mecha_core.operators import fallback, scale
from mecha_core.recipe import dump_recipe, load_recipe
from mecha_core.recipe.format import MAX_NESTING
from mecha_core.recipe.nodes import (CallNode, LiteralNode, ModelNode, ParameterNode, parameters, relocate,
                                     replace_models, substitute, walk)
from mecha_core.testing import host_with

N = 100_000
#: the most that ten times the nodes may cost (linear: 10; quadratic: 100)
MAX_GROWTH = 30.0
HOST = host_with(mecha_methods.plugin)


def chain_text(n: int) -> str:
    """n nodes: a model and n - 1 scale calls, each of the one before; named as dump names them."""
    names = ["m0", "scale"] + [f"scale_{i}" for i in range(2, n)]
    lines = ["mecha 1", 'm0 = model("m0.safetensors", type="delta")']
    lines += [f"{names[i]} = scale({names[i - 1]}, alpha=0.5)" for i in range(1, n)]
    return "\n".join(lines) + "\n"


def wide_text(n: int) -> str:
    """n nodes: n - 1 models and one n_average of them all; named as dump names them."""
    lines = ["mecha 1"] + [f'm{i} = model("m{i}.safetensors")' for i in range(n - 1)]
    lines.append("n_average = n_average(" + ", ".join(f"m{i}" for i in range(n - 1)) + ")")
    return "\n".join(lines) + "\n"


def round_trip(text: str, host=None):
    """Load, print, load again and compare: the work whose growth with the node count is checked."""
    graph = load_recipe(text, host=host)
    dumped = dump_recipe(graph)
    again = load_recipe(dumped, host=host)
    return graph, dumped, again, again == graph


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def assert_linear(large_s: float, small_work) -> None:
    """``large_s``, measured on N nodes, is at most MAX_GROWTH times ``small_work`` on N // 10."""
    small_s = min(seconds(small_work) for _ in range(2))
    assert large_s < MAX_GROWTH * small_s, f"{N // 10} nodes: {small_s:.3f} s, {N} nodes: {large_s:.3f} s"


@pytest.mark.parametrize("make", [chain_text, wide_text])
def test_a_recipe_of_100000_nodes_loads_dumps_and_round_trips(make):
    text = make(N)
    start = time.perf_counter()
    graph, dumped, again, equal = round_trip(text, HOST)
    large_s = time.perf_counter() - start
    assert dumped == text  # names, order and values print back exactly as written
    assert equal
    assert again is not graph and hash(again) == hash(graph)
    if make is chain_text:
        assert graph.method.name == "scale" and graph.args[0].args[0].method.name == "scale"
    else:
        assert len(graph.args) == N - 1
    small_text = make(N // 10)
    assert_linear(large_s, lambda: round_trip(small_text, HOST))


def fallback_line(n: int) -> str:
    return "mecha 1\nx = " + " | ".join(f'model("m{i}")' for i in range(n)) + "\n"


def test_one_line_of_40000_fallbacks_loads_and_dumps():
    text = fallback_line(40_000)
    start = time.perf_counter()
    graph, dumped, _, equal = round_trip(text)  # the core's fallback: no host needed
    large_s = time.perf_counter() - start
    assert dumped.count("\n") == 1 + 40_000 + 39_999
    assert dumped.endswith("fallback_39999 = fallback(fallback_39998, m39999)\n")
    assert equal
    small_text = fallback_line(4_000)
    assert_linear(large_s, lambda: round_trip(small_text))


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 10_000])
@pytest.mark.parametrize("opening, closing", [("fallback(", ", a)"), ("scale(", ")"), ("[", "]")])
def test_deep_nesting_in_one_line_is_a_one_line_error(depth, opening, closing):
    text = 'mecha 1\na = model("a")\nm = ' + opening * depth + "a" + closing * depth + "\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    message = str(info.value)
    column = 4 + len(opening) * (MAX_NESTING + 1)  # the first "(" or "[" beyond the limit
    assert message == (f"<recipe>:3:{column}: nested too deeply, {depth} levels; at most "
                       f"{MAX_NESTING} (give inner results names of their own, on lines before)")


def test_nesting_up_to_the_limit_works():
    text = 'mecha 1\na = model("a", type="delta")\nm = ' + "scale(" * MAX_NESTING + "a" + ")" * MAX_NESTING + "\n"
    graph = load_recipe(text)
    assert sum(isinstance(n, CallNode) for n in walk(graph)) == MAX_NESTING
    assert load_recipe(dump_recipe(graph)) == graph


def test_graph_operations_on_a_chain_deeper_than_the_recursion_limit(tmp_path):
    depth = 20 * sys.getrecursionlimit()
    bottom = ParameterNode("p")
    node = bottom
    for i in range(depth):  # built directly: nothing hashed or typed yet
        node = CallNode(scale, (node,), (("alpha", LiteralNode(i)),))
    twin = bottom
    for i in range(depth):
        twin = CallNode(scale, (twin,), (("alpha", LiteralNode(i)),))
    assert node is not twin and hash(node) == hash(twin) and node == twin
    assert node != CallNode(scale, (node.args[0],), (("alpha", LiteralNode(-1)),))
    assert node.space is None
    assert len(list(walk(node))) == depth * 2 + 1
    assert parameters(node) == [bottom]
    model = ModelNode("m.safetensors", type="delta", base_dir=str(tmp_path))
    (tmp_path / "m.safetensors").write_bytes(b"")
    filled = substitute(node, {"p": model})
    assert parameters(filled) == [] and filled.space == "delta"
    moved = relocate(filled, str(tmp_path / "sub"))
    deepest = moved
    while isinstance(deepest, CallNode):
        deepest = deepest.args[0]
    assert deepest.path == "../m.safetensors"
    swapped = replace_models(filled, lambda m: ModelNode("other.safetensors"))
    assert swapped != filled and "other.safetensors" in dump_recipe(swapped)
    assert repr(node).startswith("CallNode('scale', args=(CallNode('scale', ...)")


def test_a_deep_chain_of_operators_built_in_python():
    node = ModelNode("a.safetensors", type="base")
    for _ in range(5000):
        node = node | ModelNode("b.safetensors")
    assert node.method is fallback and node.space == "weight"
    assert load_recipe(dump_recipe(node)) == node
    assert mecha_core.load_recipe(dump_recipe(node)) == node
