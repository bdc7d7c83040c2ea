"""The plugin host, with hosts built from chosen plugins (no entry-point discovery)."""

from __future__ import annotations

import inspect
import re
import threading
from pathlib import Path

import pytest

import mecha_core
from mecha_core import hookspecs
from mecha_core.errors import PluginError, RecipeError
from mecha_core.method import merge_method
from mecha_core.plugins import (PLUGIN_API_VERSION, PluginHost, get_host, plugin_from_functions, reset_host,
                                use_host)
from mecha_core.specs import Architecture, CliCommand, Converter, KeySpec, ModelType
from mecha_core.testing import host_with, using

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOK_NAMES = sorted(name for name, fn in vars(hookspecs).items()
                    if name.startswith("mecha_") and inspect.isfunction(fn))


@merge_method
def double(a):
    """2 * a."""
    return a * 2


@merge_method
def halve(a):
    """a / 2."""
    return a / 2


def methods_plugin(name: str, *methods):
    return plugin_from_functions(name, mecha_merge_methods=lambda: list(methods))


def tiny_arch(name: str = "tiny") -> Architecture:
    return Architecture(name, {"w": KeySpec((2,), "float32", "body", blocks=("IN00",))}, blocks=("IN00",),
                        aliases=(f"{name}-alias",))


# -- hookspecs are documented -----------------------------------------------------------------------
def test_the_collector_hooks_exist():
    assert HOOK_NAMES == ["mecha_architecture_families", "mecha_architectures", "mecha_cli_commands",
                          "mecha_converters", "mecha_executors", "mecha_file_formats", "mecha_merge_methods",
                          "mecha_model_types", "mecha_recipe_formats"]


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hookspec_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    summary = doc.split("\n\n")[0]
    assert len(summary.split()) >= 5, f"{hook}: the docstring needs a summary line"
    for section in ("Returns:", "Example:"):
        assert re.search(rf"^{section}\n\s+\S", doc, re.M), f"{hook}: the docstring needs a {section} section"
    assert inspect.signature(getattr(hookspecs, hook)).parameters == {}, "collector hooks take no arguments"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_docs_plugins_md_explains_every_hook(hook):
    text = DOCS.read_text()
    assert f"`{hook}()`" in text, f"docs/plugins.md does not describe {hook}"


def test_the_host_collects_every_hook():
    """A hookspec added without a registry would silently collect nothing: every hook fills one."""
    arch = tiny_arch()
    mt = ModelType("tiny-lora", "delta", detect=lambda keys: "lora_up" in keys)
    conv = Converter("tiny-lora-to-delta", "tiny", "tiny-lora", "tiny", "delta", plan=lambda header: {})
    import typer

    command = CliCommand("tiny", app=typer.Typer(), help="Tiny things.")
    plugin = plugin_from_functions("all", mecha_architectures=lambda: [arch], mecha_model_types=lambda: [mt],
                                   mecha_converters=lambda: [conv], mecha_merge_methods=lambda: [double],
                                   mecha_cli_commands=lambda: [command])
    host = host_with(plugin)
    assert set(host.records[0].provides) == {"architectures", "model_types", "converters", "merge_methods",
                                             "cli_commands"}
    assert host.cli_commands.get("tiny") is command
    assert host.architecture("tiny") is arch
    assert host.model_types.get("tiny-lora") is mt
    assert host.converters.get("tiny-lora-to-delta") is conv
    assert host.method("double") is double


# -- hosts from chosen plugins -----------------------------------------------------------------------
def test_host_with_holds_exactly_the_given_plugins():
    host = host_with(methods_plugin("doubler", double))
    assert [(r.name, r.status) for r in host.records] == [("doubler", "ok")]
    # the plugin's method, beside the core's own operators (provided by mecha-core)
    assert host.merge_methods.names() == ["add", "double", "fallback", "scale", "subtract"]
    assert host.merge_methods.provider("double") == "doubler"
    assert {host.merge_methods.provider(n) for n in ("add", "fallback", "scale", "subtract")} == {"mecha-core"}
    with pytest.raises(RecipeError, match="unknown merge method 'weighted_sum'"):
        host.method("weighted_sum")
    # the core's own model types are always there
    assert host.model_types.names() == ["base", "delta"]


def test_host_with_names_an_installed_plugin_like_discovery_does():
    import mecha_methods.plugin

    host = host_with(mecha_methods.plugin)
    rec = host.records[0]
    assert (rec.name, rec.distribution, rec.module) == ("methods", "mecha-methods", "mecha_methods.plugin")
    assert rec.version == get_host().records[[r.name for r in get_host().records].index("methods")].version


def test_host_with_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("MECHA_DISABLE_PLUGINS", "doubler")
    host = host_with(methods_plugin("doubler", double))
    assert host.records[0].status == "ok"


def test_using_makes_a_host_current_for_mecha_core_names():
    with using(methods_plugin("doubler", double)) as host:
        assert get_host() is host
        assert mecha_core.double is double
        with pytest.raises(AttributeError, match="no merge method of that name"):
            mecha_core.weighted_sum  # noqa: B018
        assert "double" in dir(mecha_core)
    assert get_host() is not host
    assert mecha_core.weighted_sum.name == "weighted_sum"


def test_use_host_restores_the_previous_host_after_an_error():
    outer = get_host()
    inner = host_with()
    with pytest.raises(ValueError):
        with use_host(inner):
            raise ValueError("inside")
    assert get_host() is outer


def test_get_host_discovers_once_and_reset_forgets():
    first = get_host()
    assert get_host() is first
    reset_host()
    assert get_host() is not first


def test_get_host_from_many_threads_discovers_once():
    hosts: list[PluginHost] = []
    threads = [threading.Thread(target=lambda: hosts.append(get_host())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hosts) == 8 and all(h is hosts[0] for h in hosts)


def test_registry_finds_architectures_by_alias_and_suggests_names():
    host = host_with(plugin_from_functions("arch", mecha_architectures=lambda: [tiny_arch()]))
    assert host.architecture("tiny-alias").name == "tiny"
    with pytest.raises(RecipeError, match=r"unknown architecture 'tiyn'; did you mean 'tiny'\?"):
        host.architecture("tiyn")
    host = host_with(methods_plugin("doubler", double))
    with pytest.raises(RecipeError, match=r"unknown merge method 'dubble'; did you mean 'double'\?"):
        host.method("dubble")


# -- isolation ---------------------------------------------------------------------------------------
def test_a_raising_hook_marks_only_its_plugin_and_names_the_hook():
    def boom():
        raise KeyError("missing table")

    host = host_with(methods_plugin("good", double), plugin_from_functions("bad", mecha_architectures=boom),
                     strict=False)
    status = {r.name: (r.status, r.error) for r in host.records}
    assert status["good"] == ("ok", None)
    assert status["bad"] == ("error", "mecha_architectures() raised KeyError: 'missing table'")
    assert host.method("double") is double
    assert host.problems() == ["plugin 'bad': mecha_architectures() raised KeyError: 'missing table'"]


def test_a_plugin_that_fails_in_one_hook_provides_nothing_at_all():
    """Half a plugin is worse than none: its other hooks' results are dropped too."""
    def boom():
        raise RuntimeError("no")

    plugin = plugin_from_functions("half", mecha_merge_methods=lambda: [double], mecha_model_types=boom)
    host = host_with(plugin, strict=False)
    assert host.records[0].status == "error" and host.records[0].provides == {}
    assert "double" not in host.merge_methods


@pytest.mark.parametrize("returned, message", [
    (double, "mecha_merge_methods() returned MergeMethod; it must return a list of MergeMethod"),
    ([double, "halve"], "mecha_merge_methods() returned str, expected MergeMethod"),
    ([tiny_arch()], "mecha_merge_methods() returned Architecture, expected MergeMethod"),
])
def test_a_hook_returning_the_wrong_type_is_an_error(returned, message):
    host = host_with(plugin_from_functions("wrong", mecha_merge_methods=lambda: returned), strict=False)
    assert (host.records[0].status, host.records[0].error) == ("error", message)


def test_a_hook_returning_none_provides_nothing_and_is_fine():
    host = host_with(plugin_from_functions("quiet", mecha_merge_methods=lambda: None))
    assert (host.records[0].status, host.records[0].provides) == ("ok", {})


def test_an_unknown_hook_is_an_error():
    host = host_with(plugin_from_functions("typo", mecha_merge_method=lambda: [double]), strict=False)
    assert host.records[0].status == "error"
    assert "mecha_merge_method" in host.records[0].error


def test_strict_host_raises_on_the_first_failure():
    def boom():
        raise RuntimeError("broken on purpose")

    with pytest.raises(PluginError, match=r"plugin 'bad' failed: mecha_merge_methods\(\) raised RuntimeError"):
        host_with(plugin_from_functions("bad", mecha_merge_methods=boom), strict=True)


# -- duplicates --------------------------------------------------------------------------------------
def test_two_plugins_providing_one_name_fail_when_it_is_used_naming_both():
    other_double = merge_method(name="double")(lambda a: a + a)
    host = host_with(methods_plugin("one", double, halve), methods_plugin("two", other_double), strict=False)
    assert all(r.status == "ok" for r in host.records)
    with pytest.raises(PluginError) as err:
        host.method("double")
    assert str(err.value) == ("merge method 'double' is provided by both plugin 'one' and plugin 'two'; "
                              "disable one with MECHA_DISABLE_PLUGINS")
    assert host.method("halve") is halve  # other names are unaffected
    assert host.problems() == ["merge method 'double' is provided by plugin 'one' and plugin 'two'"]
    with pytest.raises(PluginError, match="'double' is provided by plugin 'one' and plugin 'two'"):
        host_with(methods_plugin("one", double), methods_plugin("two", other_double), strict=True)


def test_duplicate_architectures_are_reported_too():
    host = host_with(plugin_from_functions("a1", mecha_architectures=lambda: [tiny_arch()]),
                     plugin_from_functions("a2", mecha_architectures=lambda: [tiny_arch()]), strict=False)
    with pytest.raises(PluginError, match="architecture 'tiny' is provided by both plugin 'a1' and plugin 'a2'"):
        host.architecture("tiny")
    assert host.problems() == ["architecture 'tiny' is provided by plugin 'a1' and plugin 'a2'"]


def test_a_plugin_redefining_a_core_model_type_is_a_duplicate():
    delta = ModelType("delta", "delta", detect=lambda keys: False)
    host = host_with(plugin_from_functions("dup", mecha_model_types=lambda: [delta]), strict=False)
    assert host.problems() == ["model type 'delta' is provided by plugin 'mecha-core' and plugin 'dup'"]


# -- plugin API version --------------------------------------------------------------------------------
@pytest.mark.parametrize("declared", [PLUGIN_API_VERSION + 1, 0, "1", True])
def test_an_unsupported_plugin_api_is_refused(declared):
    plugin = methods_plugin("versioned", double)
    plugin.MECHA_PLUGIN_API = declared
    host = host_with(plugin, strict=False)
    rec = host.records[0]
    assert rec.status == "error"
    assert rec.error.startswith(f"declares MECHA_PLUGIN_API = {declared!r}, but this mecha-core supports "
                                f"plugin API {PLUGIN_API_VERSION}")
    assert "double" not in host.merge_methods


def test_the_current_plugin_api_and_none_are_accepted():
    declared = methods_plugin("declared", double)
    declared.MECHA_PLUGIN_API = PLUGIN_API_VERSION
    host = host_with(declared, methods_plugin("silent", halve))
    assert [r.status for r in host.records] == ["ok", "ok"]
