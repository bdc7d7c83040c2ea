"""Spec validation at load (mecha_core/validate.py): a plugin returning a spec the core cannot use
is ``error`` with one line naming the spec and field, registers nothing, and the others work.
``check_plugin`` and ``mecha plugins check`` run the same contract."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mecha_core.cli import app
from mecha_core.engine.safetensors_io import DTYPES
from mecha_core.errors import PluginError
from mecha_core.method import merge_method
from mecha_core.plugins import plugin_from_functions
from mecha_core.specs import Architecture, CliCommand, Converter, KeySpec, ModelType
from mecha_core.testing import check_plugin, host_with, using
from mecha_core.validate import STORABLE_DTYPES


@merge_method
def keep(a):
    """Returns a."""
    return a


def key(**kw):
    fields = dict(shape=(2,), dtype="float32", component="body")
    fields.update(kw)
    return KeySpec(**fields)


def arch(**kw):
    fields = dict(name="tiny", keys={"w": key(blocks=("IN00",), klass="proj")}, blocks=("IN00",), classes=("proj",))
    fields.update(kw)
    return Architecture(**fields)


def plan(header):
    return {}


BAD_SPECS = [
    ("mecha_architectures", arch(keys=[("w", key())]),
     "architecture 'tiny': keys must be a mapping of key name to KeySpec, got list"),
    ("mecha_architectures", arch(keys={"w": (2,)}), "architecture 'tiny': key 'w' must map to a KeySpec, got tuple"),
    ("mecha_architectures", arch(keys={1: key()}), "architecture 'tiny': key names must be non-empty str, got 1"),
    ("mecha_architectures", arch(keys={"w": key(shape=[2])}),
     "architecture 'tiny': key 'w' has shape [2]; use a tuple of non-negative ints"),
    ("mecha_architectures", arch(keys={"w": key(shape=(2, -1))}),
     "architecture 'tiny': key 'w' has shape (2, -1); use a tuple of non-negative ints"),
    ("mecha_architectures", arch(keys={"w": key(shape=(True,))}),
     "architecture 'tiny': key 'w' has shape (True,); use a tuple of non-negative ints"),
    ("mecha_architectures", arch(keys={"w": key(dtype="complex64")}),
     "architecture 'tiny': key 'w' has dtype 'complex64', not a torch dtype name safetensors can store"),
    ("mecha_architectures", arch(keys={"w": key(component=None)}),
     "architecture 'tiny': key 'w': component must be a non-empty str, got None"),
    ("mecha_architectures", arch(keys={"w": key(optional="yes")}),
     "architecture 'tiny': key 'w': optional must be a bool, got str"),
    ("mecha_architectures", arch(keys={"w": key(blocks="IN00")}),
     "architecture 'tiny': key 'w': blocks must be a tuple of str, got 'IN00'"),
    ("mecha_architectures", arch(keys={"w": key(aliases=["old.w"])}),
     "architecture 'tiny': key 'w': aliases must be a tuple of str, got ['old.w']"),
    ("mecha_architectures", arch(keys={"w": key(blocks=("OUT05",))}),
     "architecture 'tiny': key 'w' is in blocks ['OUT05'] that the architecture does not list"),
    ("mecha_architectures", arch(keys={"w": key(klass="mlp")}),
     "architecture 'tiny': key 'w' has class 'mlp' that the architecture does not list"),
    ("mecha_architectures", arch(keys={"w": key(), "v": key(aliases=("w",))}),
     "architecture 'tiny': alias 'w' of key 'v' is also a key of the architecture"),
    ("mecha_architectures", arch(keys={"w": key(aliases=("old",)), "v": key(aliases=("old",))}),
     "architecture 'tiny': alias 'old' is given to both key 'w' and key 'v'"),
    ("mecha_architectures", arch(keys={"w": key(aliases=("old", "old"))}),
     "architecture 'tiny': key 'w' lists alias 'old' twice"),
    ("mecha_architectures", arch(blocks=["IN00"]), "architecture 'tiny': blocks must be a tuple of str, got ['IN00']"),
    ("mecha_architectures", arch(classes=("proj", "proj")),
     "architecture 'tiny': classes list ['proj'] more than once"),
    ("mecha_architectures", arch(name=None), "architecture with name None: name must be a non-empty str, got None"),
    ("mecha_architectures", arch(min_match="0.9"),
     "architecture 'tiny': min_match must be a number in (0, 1], got '0.9'"),
    ("mecha_architectures", arch(component_aliases={"txt": 1}),
     "architecture 'tiny': component_aliases must be a mapping of str to str, got {'txt': 1}"),
    ("mecha_model_types", ModelType("t", "param", detect=lambda keys: False),
     "model type 't': space must be 'weight' or 'delta', got 'param'"),
    ("mecha_model_types", ModelType("t", "delta", detect=None),
     "model type 't': detect must be callable, got NoneType"),
    ("mecha_converters", Converter("c", None, "t", None, "weight", plan=plan),
     "converter 'c': target_type 'weight' is a merge space, not a model type"),
    ("mecha_converters", Converter("c", None, "", None, "delta", plan=plan),
     "converter 'c': source_type must be a non-empty str, got ''"),
    ("mecha_converters", Converter("c", 3, "t", None, "delta", plan=plan),
     "converter 'c': source_arch must be a str or None, got int"),
    ("mecha_converters", Converter("c", None, "t", None, "delta", plan={}),
     "converter 'c': plan must be callable, got dict"),
    ("mecha_converters", Converter("loop", "tiny", "base", "tiny", "base", plan=plan),
     "converter 'loop' converts (tiny, base) to itself"),
    ("mecha_cli_commands", CliCommand("merge", app=typer.Typer(), help="x"),
     "cli command 'merge' conflicts with the core command 'mecha merge'; choose another name"),
    ("mecha_cli_commands", CliCommand("Bad Name", app=typer.Typer(), help="x"),
     "cli command 'Bad Name': the name must be lower-case letters, digits and '-', starting with a letter"),
    ("mecha_cli_commands", CliCommand("thing", app=[], help="x"),
     "cli command 'thing': app must be a typer.Typer, got list"),
]


@pytest.mark.parametrize("hook, spec, problem", BAD_SPECS, ids=[b[2][:60] for b in BAD_SPECS])
def test_a_bad_spec_marks_its_plugin_error_and_the_others_load(hook, spec, problem):
    bad = plugin_from_functions("bad", **{hook: lambda: [spec]})
    good = plugin_from_functions("good", mecha_merge_methods=lambda: [keep])
    host = host_with(bad, good, strict=False)
    records = {r.name: r for r in host.records}
    assert records["bad"].status == "error"
    assert records["bad"].error.startswith(problem), records["bad"].error
    assert "\n" not in records["bad"].error
    assert records["bad"].provides == {}
    assert records["good"].status == "ok"
    assert [n for n in host.merge_methods.names() if host.merge_methods.provider(n) != "mecha-core"] == ["keep"]
    for registry in (host.architectures, host.converters, host.cli_commands):
        assert registry.names() == []
    assert host.model_types.names() == ["base", "delta"]  # the core's own only
    # the same contract, every problem listed, from check_plugin
    assert any(p.startswith(problem) for p in check_plugin(bad)), check_plugin(bad)
    with pytest.raises(PluginError, match="plugin 'bad' failed: "):
        host_with(bad, strict=True)


def test_a_method_with_an_unknown_merge_space_is_refused():
    import attrs

    broken = attrs.evolve(keep, name="odd", returns="wieght")  # a MergeMethod built by hand
    host = host_with(plugin_from_functions("bad", mecha_merge_methods=lambda: [broken]), strict=False)
    assert host.records[0].error == "merge method 'odd': unknown merge space 'wieght' (known: weight, delta, param)"
    assert "odd" not in host.merge_methods


def test_only_the_first_error_is_the_record_and_check_lists_every_one():
    bad = plugin_from_functions("bad", mecha_architectures=lambda: [arch(name="a", keys=[]), arch(name="b", blocks=[])],
                                mecha_model_types=lambda: [ModelType("t", "param", detect=lambda keys: False)])
    host = host_with(bad, strict=False)
    assert host.records[0].error == ("architecture 'a': keys must be a mapping of key name to KeySpec, got list "
                                     "(and 2 more; `mecha plugins check` lists them)")
    assert check_plugin(bad) == [
        "architecture 'a': keys must be a mapping of key name to KeySpec, got list",
        "architecture 'b': blocks must be a tuple of str, got []",
        "model type 't': space must be 'weight' or 'delta', got 'param'"]
    with using(host):
        checked = CliRunner().invoke(app, ["plugins", "check"])
    assert checked.exit_code == 2
    assert [line for line in checked.stderr.splitlines() if line.startswith("problem:")] == [
        "problem: plugin 'bad': architecture 'a': keys must be a mapping of key name to KeySpec, got list "
        "(and 2 more; `mecha plugins check` lists them)",
        "problem: plugin 'bad': architecture 'b': blocks must be a tuple of str, got []",
        "problem: plugin 'bad': model type 't': space must be 'weight' or 'delta', got 'param'"]


def test_check_only_warnings_do_not_fail_loading_but_plugins_check_reports_them():
    undocumented = merge_method(name="undocumented")(lambda a: a)
    conv = Converter("c", None, "nobody-defines-this", None, "delta", plan=plan)
    plugin = plugin_from_functions("sloppy", mecha_merge_methods=lambda: [undocumented],
                                   mecha_converters=lambda: [conv])
    host = host_with(plugin, strict=False)
    assert host.records[0].status == "ok" and "undocumented" in host.merge_methods
    with using(host):
        checked = CliRunner().invoke(app, ["plugins", "check"])
    assert checked.exit_code == 0, checked.output
    assert checked.stdout == "all plugins ok (2 warnings)\n"
    assert checked.stderr.splitlines() == [
        "warning: plugin 'sloppy': merge method 'undocumented' has no docstring",
        "warning: plugin 'sloppy': converter 'c': source_type 'nobody-defines-this' is a model type no loaded "
        "plugin defines"]
    assert check_plugin(plugin) == ["merge method 'undocumented' has no docstring"]


def test_the_listed_dtypes_are_exactly_what_safetensors_stores():
    assert STORABLE_DTYPES == {name for name, _ in DTYPES.values()}
