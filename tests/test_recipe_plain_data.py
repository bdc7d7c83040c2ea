"""Recipes are plain data: building, parsing, dumping and composing never consult the
process-wide plugin host; the core's operators work with no plugin; every parsed node knows
where it was written; values are checked when the call is built."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
from mecha_core.errors import RecipeError
from mecha_core.plugins import PluginHost, plugin_from_functions, use_host
from mecha_core.recipe import compose as plain_compose
from mecha_core.recipe import dump_recipe
from mecha_core.recipe import load_recipe as plain_load
from mecha_core.recipe.nodes import (CallNode, LiteralNode, Location, ModelNode, ParameterNode,
                                     canonical_map_archs, walk)
from mecha_core.recipe.values import blocks
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import host_with, write_checkpoint

CORE = pathlib.Path(mecha_core.__file__).parent
OPERATORS = {"subtract", "add", "scale", "fallback"}


def toy_arch(name: str, aliases: tuple[str, ...]) -> Architecture:
    return Architecture(name, {"w": KeySpec((2,), "float32", "unet", blocks=("IN00",))}, blocks=("IN00",),
                        aliases=aliases)


def arch_plugin(plugin_name: str, arch: Architecture):
    return plugin_from_functions(plugin_name, mecha_architectures=lambda: [arch])


# -- layering -----------------------------------------------------------------------------------
def _imports(path: pathlib.Path, module: str) -> set[str]:
    """Every mecha_core module ``path`` imports, lazy imports included, TYPE_CHECKING ones not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("mecha_core")}


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, name):
            while imported and imported not in modules:  # ``from .x import name``: the module x
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_the_recipe_package_imports_no_host_engine_cli_api_or_operators():
    graph = _module_graph()
    recipe_modules = [m for m in graph if m.startswith("mecha_core.recipe")]
    assert "mecha_core.recipe.nodes" in recipe_modules and len(recipe_modules) >= 5  # sdmecha*.py moved to mecha-sdmecha
    forbidden = ("mecha_core.plugins", "mecha_core.engine", "mecha_core.cli", "mecha_core.api",
                 "mecha_core.operators", "mecha_core.method")
    bad = {m: sorted(t for t in graph[m] if t.startswith(forbidden) or t == "mecha_core")
           for m in recipe_modules}
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_import_cycle_runs_through_the_recipe_layer():
    graph = _module_graph()
    assert "mecha_core.recipe.nodes" in graph["mecha_core.method"]  # one way: method -> nodes

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            m = stack.pop()
            for t in graph.get(m, ()):
                if t == goal:
                    return True
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return False

    mine = [m for m in graph if m.startswith("mecha_core.recipe")] + ["mecha_core.method", "mecha_core.operators"]
    assert [m for m in mine if reaches(m, m)] == []


# -- the host given is the only one consulted ---------------------------------------------------
TEXT = 'mecha 1\na = model("a")\nb = model("b")\nm = weighted_sum(a, b, alpha=blocks("toy", IN00=0.5))\n'


def test_parsing_resolves_aliases_and_methods_through_the_given_host_only():
    given = host_with(mecha_methods.plugin, arch_plugin("arch", toy_arch("toy-ldm", ("toy",))))
    # the process-wide host knows the alias as another architecture, and has no weighted_sum
    other = host_with(arch_plugin("other", toy_arch("toy-other", ("toy",))))
    with use_host(other):
        r = plain_load(TEXT, host=given)
        assert r.kwargs[0][1].value.arch == "toy-ldm"
        assert r.method is given.method("weighted_sum")
        with pytest.raises(RecipeError, match="unknown merge method 'weighted_sum'"):
            mecha_core.load_recipe(TEXT)  # the public default: the process-wide host
        assert mecha_core.load_recipe(TEXT, host=given) == r


def test_without_a_host_only_the_core_operators_are_known_and_names_stay_as_written():
    r = plain_load('mecha 1\na = model("a")\nb = model("b")\nm = scale(a | b, alpha=0.5)\n')
    assert [n.method.name for n in walk(r) if isinstance(n, CallNode)] == ["fallback", "scale"]
    with pytest.raises(RecipeError, match=r"^<recipe>:4:5: unknown merge method 'weighted_sum' \(no plugin host"):
        plain_load(TEXT)


def test_maps_built_in_python_keep_the_architecture_as_written_until_canonicalised():
    with use_host(host_with(arch_plugin("arch", toy_arch("toy-ldm", ("toy",))))):
        m = blocks("toy", IN00=0.5)
    assert m.arch == "toy"  # not looked up: recipes consult no plugin
    a, b = ModelNode("a"), ModelNode("b")
    r = (a | b) * m
    fixed = canonical_map_archs(r, lambda name: {"toy": "toy-ldm"}.get(name, name))
    assert fixed.kwargs[0][1].value.arch == "toy-ldm" and r.kwargs[0][1].value.arch == "toy"
    assert fixed.args == r.args
    assert canonical_map_archs(r, lambda name: name) is r  # nothing to rename: the same graph


def test_compose_needs_a_host_only_to_read_files(tmp_path):
    template = plain_load('mecha 1\np = parameter("p")\nm = scale(p, alpha=2)\n')
    filled = plain_compose(template, p=ModelNode("x.safetensors"))  # no host anywhere
    assert filled.args[0] == ModelNode("x.safetensors")
    part = tmp_path / "part.mecha"
    part.write_text('mecha 1\na = model("a")\nb = model("b")\nw = weighted_sum(a, b)\n')
    with pytest.raises(RecipeError, match="unknown merge method 'weighted_sum'"):
        plain_compose(template, p=str(part))
    host = host_with(mecha_methods.plugin)
    assert plain_compose(template, p=str(part), host=host).args[0].method.name == "weighted_sum"
    # a mapping fills a parameter named like compose's own keyword
    named_host = plain_load('mecha 1\nhost = parameter("host")\nm = scale(host)\n')
    assert plain_compose(named_host, {"host": "y.safetensors"}).args[0].path == "y.safetensors"


# -- the core's operators -------------------------------------------------------------------------
def test_the_core_provides_the_operators_and_mecha_methods_does_not():
    bare = PluginHost(autoload=False)
    assert set(bare.merge_methods.names()) == OPERATORS
    assert {bare.merge_methods.provider(n) for n in OPERATORS} == {"mecha-core"}
    assert OPERATORS.isdisjoint(m.name for m in mecha_methods.plugin.METHODS)
    full = host_with(mecha_methods.plugin)  # strict: a name claimed twice would raise
    assert full.merge_methods.duplicates() == {}
    assert full.merge_methods.provider("subtract") == "mecha-core"


def test_a_core_with_no_plugin_merges_the_operators(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0, 3.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([0.5, -1.0, 1.0])})
    write_checkpoint(tmp_path / "c.safetensors", {"w": torch.tensor([9.0, 9.0, 9.0]), "v": torch.tensor([4.0])})
    a, b, c = (ModelNode(str(tmp_path / f"{n}.safetensors"), type="base") for n in "abc")
    recipe = (b + (a - b) * 0.5) | c  # "v" only in c: fallback gives c's
    bare = PluginHost(autoload=False)
    with use_host(bare):
        out = mecha_core.merge(recipe, tmp_path / "out.safetensors", host=bare)
    got = load_file(out)
    assert torch.equal(got["w"], torch.tensor([0.75, 0.5, 2.0]))  # b + (a - b) / 2, by hand
    assert torch.equal(got["v"], torch.tensor([4.0]))


# -- locations ------------------------------------------------------------------------------------
def test_every_parsed_node_knows_its_file_line_and_column(tmp_path):
    path = tmp_path / "r.mecha"
    path.write_text('mecha 1\n# comment\na = model("a")\np = parameter("p")\n'
                    'm = weighted_sum(a, p, alpha=0.25) | a\n')
    r = mecha_core.load_recipe(path)
    assert r.where == Location(str(path), 5, 36)  # the fallback: its '|'
    ws = r.args[0]
    assert ws.where == Location(str(path), 5, 5) and str(ws.where) == f"{path}:5:5"
    assert ws.args[0].where == Location(str(path), 3, 5)
    assert ws.args[1].where == Location(str(path), 4, 5)
    assert ws.kwargs[0][1].where == Location(str(path), 5, 30)
    text = mecha_core.load_recipe(path.read_text())
    assert str(text.args[0].where) == "<recipe>:5:5" and text == r  # locations are not identity
    assert all(n.where is None for n in walk(mecha_core.weighted_sum(ModelNode("a"), ModelNode("b"), alpha=1)))


# -- values checked when the call is built ------------------------------------------------------
HEAD = 'mecha 1\na = model("a")\nb = model("b")\n'


@pytest.mark.parametrize("text, column, fragments", [
    (HEAD + "m = geometric_median(a, b, maxiter=1000000000000000000000000000000)\n", 36,
     ["must fit in 64 bits", "1000000000000000000000000000000"]),
    (HEAD + "m = geometric_median(a, b, maxiter=-9223372036854775809)\n", 36, ["must fit in 64 bits"]),
    (HEAD + 'm = ties(a, b, vote="bogus")\n', 21, ['ties(vote="bogus"): use one of "sum", "count"']),
    (HEAD + 'm = dare_linear(a, b, density=0.5, rescale="L1")\n', 44, ['use one of "density", "l1", "none"']),
    (HEAD + "m = ties(a, b, weights=[1, 99999999999999999999])\n", 24, ["ties(weights=...)", "must fit in 64 bits"]),
])
def test_bad_values_point_at_the_value(text, column, fragments):
    with pytest.raises(RecipeError) as info:
        mecha_core.load_recipe(text, host=host_with(mecha_methods.plugin))
    err = info.value
    line = 4
    assert (err.line, err.column) == (line, column), str(err)
    assert "\n" not in str(err) and str(err).startswith(f"<recipe>:{line}:{column}: ")
    for fragment in fragments:
        assert fragment in str(err)


def test_values_are_checked_in_python_too():
    host = host_with(mecha_methods.plugin)
    a, b = ModelNode("a"), ModelNode("b")
    with pytest.raises(RecipeError, match=r"^geometric_median\(maxiter=\.\.\.\): "
                                          r"an integer hyperparameter must fit in 64 bits"):
        host.method("geometric_median")(a, b, maxiter=2 ** 63)
    assert host.method("geometric_median")(a, b, maxiter=2 ** 63 - 1).kwargs[0][1].value == 2 ** 63 - 1
    with pytest.raises(RecipeError, match=r"block/class value for 'IN00' must fit in 64 bits"):
        blocks("sd1-ldm", IN00=-(2 ** 63) - 1)
    with pytest.raises(RecipeError, match='use one of "sum", "count"'):
        host.method("ties")(a, b, vote="Sum")
    assert host.method("ties")(a, b, vote="count").kwargs[0] == ("vote", LiteralNode("count"))


def test_a_parameter_filled_later_is_checked_against_the_choices():
    host = host_with(mecha_methods.plugin)
    template = host.method("ties")(ModelNode("a"), ModelNode("b"), vote=ParameterNode("v"))
    assert plain_compose(template, v=mecha_core.literal("count")).kwargs[0][1] == LiteralNode("count")
    with pytest.raises(RecipeError, match='use one of "sum", "count"'):
        plain_compose(template, v=mecha_core.literal("most"))
    assert dump_recipe(template).count('parameter("v")') == 1
