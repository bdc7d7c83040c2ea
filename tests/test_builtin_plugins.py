"""Each builtin plugin loads alone (a host with only that plugin) and passes the plugin contract."""

from __future__ import annotations

import importlib

import pytest
from importlib_metadata import entry_points

from mecha_core.testing import check_plugin, host_with

BUILTINS = ["methods", "sd1", "sdxl", "sd3", "lora"]


@pytest.mark.parametrize("name", BUILTINS)
def test_the_builtin_is_installed_under_its_entry_point(name):
    found = [ep for ep in entry_points(group="mecha") if ep.name == name]
    assert len(found) == 1
    assert found[0].value == f"mecha_{name}.plugin"
    assert found[0].dist.name == f"mecha-{name}"


@pytest.mark.parametrize("name", BUILTINS)
def test_the_builtin_loads_alone_and_passes_the_contract(name):
    module = importlib.import_module(f"mecha_{name}.plugin")
    host = host_with(module)  # strict: any failure raises here
    record = host.records[0]
    assert (record.name, record.status, record.distribution) == (name, "ok", f"mecha-{name}")
    assert check_plugin(module) == []
    # whatever it provides is registered under that plugin alone
    for kind, names in record.provides.items():
        registry = getattr(host, kind)
        assert sorted(names) == [n for n in registry.names() if registry.provider(n) == name]


def test_the_methods_plugin_provides_the_standard_methods_alone():
    import mecha_methods.plugin

    host = host_with(mecha_methods.plugin)
    assert {"weighted_sum", "n_average", "add_difference", "subtract", "add", "scale", "fallback"} <= set(
        host.merge_methods.names())
    assert host.architectures.names() == []
