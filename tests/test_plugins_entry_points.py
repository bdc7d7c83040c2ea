"""Third-party plugins found through real ``mecha`` entry points.

Each test "installs" fixture plugins (tests/fixtures/plugins/) into a temporary folder the way pip
would: the module plus a ``<dist>-<version>.dist-info/`` folder holding METADATA and
entry_points.txt. In-process tests put that folder on sys.path; subprocess tests put it on
PYTHONPATH and run ``python -m mecha_core`` or a script, as a user would.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.errors import PluginError
from mecha_core.plugins import PluginHost, get_host
from mecha_core.testing import install_plugin, write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
FIXTURE_MODULES = sorted(p.stem for p in FIXTURES.glob("mecha_*.py"))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path (and PYTHONPATH, for subprocesses) to install fixture plugins into."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    for var in ("MECHA_LOAD_PLUGINS", "MECHA_DISABLE_PLUGINS", "MECHA_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    yield folder
    for name in FIXTURE_MODULES:  # the next test installs fresh copies
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def install_fixture(site: Path) -> None:
    install_plugin(site, FIXTURES / "mecha_fixture_plugin.py",
                   entry="fixture", dist="mecha-fixture-plugin", version="1.2.3")


def install_broken(site: Path) -> None:
    install_plugin(site, FIXTURES / "mecha_broken_plugin.py",
                   entry="broken", dist="mecha-broken-plugin", version="0.0.1")


def record(host: PluginHost, name: str):
    found = [r for r in host.records if r.name == name]
    assert len(found) == 1, [r.name for r in host.records]
    return found[0]


def two_checkpoints(folder: Path) -> tuple[str, str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
    b = {"w": torch.tensor([[10.0, 20.0], [30.0, 40.0]]), "b": torch.tensor([1.5, 2.5])}
    return (write_checkpoint(folder / "a.safetensors", a), write_checkpoint(folder / "b.safetensors", b), a, b)


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)


# -- in process: the host sees real entry points --------------------------------------------------
def test_an_installed_plugin_is_discovered_with_its_distribution_and_version(site):
    install_fixture(site)
    host = get_host()
    fixture = record(host, "fixture")
    assert (fixture.status, fixture.error) == ("ok", None)
    assert fixture.distribution in ("mecha-fixture-plugin", "mecha_fixture_plugin")
    assert fixture.version == "1.2.3"
    assert fixture.module == "mecha_fixture_plugin"
    assert fixture.provides == {"merge_methods": ["scale_sum"]}
    assert host.merge_methods.provider("scale_sum") == "fixture"
    # the builtins are still there beside it
    assert record(host, "methods").status == "ok"


def test_an_installed_plugins_method_merges_real_files(site, tmp_path):
    install_fixture(site)
    pa, pb, a, b = two_checkpoints(tmp_path)
    out = mecha_core.merge(mecha_core.scale_sum(mecha_core.model(pa), mecha_core.model(pb), factor=0.25),
                           output=tmp_path / "out.safetensors")
    merged = load_file(out)
    assert sorted(merged) == ["b", "w"]
    # (1 + 10) * 0.25 = 2.75 ... computed here by hand, element by element
    assert merged["w"].tolist() == [[2.75, 5.5], [8.25, 11.0]]
    assert merged["b"].tolist() == [0.5, 0.5]


def test_a_plugin_that_fails_to_import_is_an_error_and_the_rest_work(site, tmp_path):
    install_fixture(site)
    install_broken(site)
    host = get_host()
    broken = record(host, "broken")
    assert broken.status == "error"
    assert "ModuleNotFoundError" in broken.error
    assert "mecha_fixture_dependency_that_is_not_installed" in broken.error
    assert broken.version == "0.0.1" and broken.provides == {}
    assert record(host, "fixture").status == "ok"
    assert {"scale_sum", "weighted_sum"} <= set(host.merge_methods.names())
    assert any("broken" in p and "ModuleNotFoundError" in p for p in host.problems())
    pa, pb, a, b = two_checkpoints(tmp_path)
    merged = load_file(mecha_core.merge(mecha_core.weighted_sum(pa, pb, alpha=0.5), output=tmp_path / "o.safetensors"))
    assert merged["b"].tolist() == [1.0, 1.0]


def test_a_plugin_whose_hook_raises_is_an_error_naming_the_hook(site):
    install_plugin(site, FIXTURES / "mecha_raising_plugin.py",
                   entry="raising", dist="mecha-raising-plugin", version="2.0")
    install_fixture(site)
    host = get_host()
    raising = record(host, "raising")
    assert raising.status == "error"
    assert raising.error == ("mecha_merge_methods() raised RuntimeError: "
                             "the raising fixture plugin failed on purpose")
    assert record(host, "fixture").status == "ok"
    assert "scale_sum" in host.merge_methods


def test_two_plugins_with_one_method_name_are_reported_naming_both(site, tmp_path, monkeypatch):
    install_fixture(site)
    install_plugin(site, FIXTURES / "mecha_rival_plugin.py",
                   entry="rival", dist="mecha-rival-plugin", version="0.3")
    host = get_host()
    assert record(host, "fixture").status == "ok" and record(host, "rival").status == "ok"
    assert "merge method 'scale_sum' is provided by plugin 'fixture' and plugin 'rival'" in host.problems()
    with pytest.raises(PluginError) as err:
        mecha_core.scale_sum("a.safetensors", "b.safetensors")
    assert "'scale_sum'" in str(err.value) and "'fixture'" in str(err.value) and "'rival'" in str(err.value)
    # the rival's other method is unaffected
    pa, pb, a, b = two_checkpoints(tmp_path)
    merged = load_file(mecha_core.merge(mecha_core.rival_only(pa, pb), output=tmp_path / "o.safetensors"))
    assert merged["b"].tolist() == [-1.0, -3.0]
    # disabling one of them resolves the conflict, and the other's definition is the one used
    monkeypatch.setenv("MECHA_DISABLE_PLUGINS", "rival")
    mecha_core.plugins.reset_host()
    merged = load_file(mecha_core.merge(mecha_core.scale_sum(pa, pb), output=tmp_path / "o2.safetensors"))
    assert merged["b"].tolist() == [6.0, 6.0]  # (0.5 + 1.5) * 3, (-0.5 + 2.5) * 3


def test_load_and_disable_lists_mark_plugins_disabled(site, monkeypatch):
    install_fixture(site)
    monkeypatch.setenv("MECHA_LOAD_PLUGINS", "fixture, methods")
    host = get_host()
    assert {r.name: r.status for r in host.records} == {
        "fixture": "ok", "methods": "ok", "sd1": "disabled", "sdxl": "disabled", "sd3": "disabled",
        "lora": "disabled", "ray": "disabled"}
    assert record(host, "sd1").version is not None  # a disabled plugin still shows its version

    mecha_core.plugins.reset_host()
    monkeypatch.delenv("MECHA_LOAD_PLUGINS")
    monkeypatch.setenv("MECHA_DISABLE_PLUGINS", "fixture")
    host = get_host()
    assert record(host, "fixture").status == "disabled"
    assert record(host, "fixture").provides == {}
    assert "scale_sum" not in host.merge_methods
    assert record(host, "methods").status == "ok"
    with pytest.raises(AttributeError, match="scale_sum"):
        mecha_core.scale_sum  # noqa: B018


def test_a_load_list_naming_a_plugin_that_is_not_installed_is_a_problem(site, monkeypatch):
    monkeypatch.setenv("MECHA_LOAD_PLUGINS", "methods,mehtods")
    host = get_host()
    assert record(host, "methods").status == "ok"
    assert [p for p in host.problems() if "mehtods" in p] == [
        next(p for p in host.problems() if p.startswith("MECHA_LOAD_PLUGINS names 'mehtods', which is not installed"))]


def test_strict_mode_raises_on_a_broken_plugin(site, monkeypatch):
    install_broken(site)
    monkeypatch.setenv("MECHA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin 'broken' failed: ModuleNotFoundError"):
        get_host()
    with pytest.raises(PluginError):  # nothing half-loaded is kept: it fails again the same way
        mecha_core.weighted_sum  # noqa: B018
    monkeypatch.setenv("MECHA_STRICT_PLUGINS", "0")
    assert record(get_host(), "broken").status == "error"


def test_strict_mode_raises_on_two_plugins_claiming_a_name(site, monkeypatch):
    install_fixture(site)
    install_plugin(site, FIXTURES / "mecha_rival_plugin.py",
                   entry="rival", dist="mecha-rival-plugin", version="0.3")
    monkeypatch.setenv("MECHA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'scale_sum' is provided by plugin 'fixture' and plugin 'rival'"):
        get_host()


def test_a_plugin_for_a_newer_plugin_api_is_refused_clearly(site):
    install_plugin(site, FIXTURES / "mecha_future_plugin.py",
                   entry="future", dist="mecha-future-plugin", version="9.0")
    install_fixture(site)  # declares no MECHA_PLUGIN_API at all: accepted
    host = get_host()
    future = record(host, "future")
    assert future.status == "error"
    assert future.error.startswith(f"declares MECHA_PLUGIN_API = 99, but this mecha-core supports plugin API "
                                   f"{mecha_core.PLUGIN_API_VERSION}")
    assert "future_method" not in host.merge_methods
    assert record(host, "fixture").status == "ok"


def test_a_plugin_importing_a_name_mecha_core_lacks_fails_as_an_import_error(site):
    # Regression: this used to re-enter plugin discovery from inside it and deadlock.
    install_plugin(site, FIXTURES / "mecha_newer_core_plugin.py",
                   entry="newer", dist="mecha-newer-core-plugin", version="1.0")
    newer = record(get_host(), "newer")
    assert newer.status == "error"
    assert newer.error.startswith("ImportError: cannot import name 'a_name_mecha_core_does_not_have'")


def test_discovery_happens_once_per_process(site, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MECHA_TEST_IMPORT_MARKER", str(marker))
    install_plugin(site, FIXTURES / "mecha_marker_plugin.py",
                   entry="marker", dist="mecha-marker-plugin", version="1.0")
    assert not marker.exists()
    host = get_host()
    assert mecha_core.weighted_sum.name == "weighted_sum"
    assert get_host() is host
    assert marker.read_text() == "imported\n"


# -- in a fresh process, as a user runs it -----------------------------------------------------------
def test_importing_mecha_core_does_not_discover_plugins(site, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MECHA_TEST_IMPORT_MARKER", str(marker))
    install_plugin(site, FIXTURES / "mecha_marker_plugin.py",
                   entry="marker", dist="mecha-marker-plugin", version="1.0")
    script = ("import os, mecha_core, mecha_core.cli, mecha_core.testing\n"
              "marker = os.environ['MECHA_TEST_IMPORT_MARKER']\n"
              "print('after import:', os.path.exists(marker))\n"
              "mecha_core.weighted_sum\n"
              "mecha_core.add\n"
              "print('after use:', open(marker).read().count('imported'))\n")
    done = run_python("-c", script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["after import: False", "after use: 1"]


def test_cli_lists_a_third_party_plugin_and_a_broken_one(site, tmp_path):
    install_fixture(site)
    install_broken(site)
    listed = run_python("-m", "mecha_core", "plugins", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr  # always 0, even with a broken plugin
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"methods", "sd1", "sdxl", "sd3", "lora", "ray", "fixture", "broken"}
    for row in rows.values():
        assert {"name", "distribution", "version", "status", "error", "provides"} <= set(row)
    assert rows["fixture"]["distribution"] in ("mecha-fixture-plugin", "mecha_fixture_plugin")
    assert (rows["fixture"]["version"], rows["fixture"]["status"], rows["fixture"]["error"]) == ("1.2.3", "ok", None)
    assert rows["fixture"]["provides"] == {"merge_methods": ["scale_sum"]}
    assert rows["broken"]["status"] == "error"
    assert "mecha_fixture_dependency_that_is_not_installed" in rows["broken"]["error"]
    assert rows["methods"]["status"] == "ok" and "weighted_sum" in rows["methods"]["provides"]["merge_methods"]

    # the same host in process (one fresh process is enough to show the real command works)
    from typer.testing import CliRunner

    from mecha_core.cli import app

    checked = CliRunner().invoke(app, ["plugins", "check"])
    assert checked.exit_code == 2
    assert "problem: plugin 'broken': ModuleNotFoundError" in checked.stderr

    methods = CliRunner().invoke(app, ["methods", "scale_sum", "--json"])
    assert methods.exit_code == 0, methods.output
    described = json.loads(methods.stdout)
    assert described["plugin"] == "fixture"
    assert described["hyperparameters"] == [{"name": "factor", "default": 3.0, "type": "float"}]
    assert [i["name"] for i in described["inputs"]] == ["a", "b"]


def test_a_third_party_method_merges_through_mecha_core_merge_in_a_fresh_process(site, tmp_path):
    install_fixture(site)
    install_broken(site)  # a broken neighbour must not get in the way
    pa, pb, a, b = two_checkpoints(tmp_path)
    script = ("import sys, mecha_core\n"
              "recipe = mecha_core.scale_sum(mecha_core.model(sys.argv[1]), mecha_core.model(sys.argv[2]))\n"
              "print(mecha_core.merge(recipe, output=sys.argv[3]))\n")
    out = tmp_path / "merged.safetensors"
    done = run_python("-c", script, pa, pb, str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    merged = load_file(out)
    for key in ("w", "b"):  # the default factor, 3.0
        expected = [(x + y) * 3.0 for x, y in zip(a[key].flatten().tolist(), b[key].flatten().tolist())]
        assert merged[key].flatten().tolist() == expected
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["mecha_plugins"])
    assert recorded == {"fixture": "1.2.3"}


def test_strict_mode_stops_a_merge_but_not_the_plugin_listing(site, monkeypatch):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    install_broken(site)
    monkeypatch.setenv("MECHA_STRICT_PLUGINS", "1")
    runner = CliRunner()
    listed = runner.invoke(app, ["plugins", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {r["name"]: r["status"] for r in json.loads(listed.stdout)}["broken"] == "error"
    checked = runner.invoke(app, ["plugins", "check"])
    assert checked.exit_code == 2 and "problem: plugin 'broken': ModuleNotFoundError" in checked.stderr
    methods = runner.invoke(app, ["methods"])
    assert methods.exit_code == 2
    assert methods.stderr.startswith("error: plugin 'broken' failed: ModuleNotFoundError")
    assert len(methods.stderr.splitlines()) == 1


def test_two_distributions_using_one_plugin_name_are_reported(site):
    install_fixture(site)
    install_plugin(site, FIXTURES / "mecha_rival_plugin.py",
                   entry="fixture", dist="mecha-rival-plugin", version="0.3")
    host = get_host()
    assert [r.name for r in host.records].count("fixture") == 2
    assert any(p.startswith("plugin name 'fixture' is used by ") and "mecha-rival-plugin" in p
               and ("mecha-fixture-plugin" in p or "mecha_fixture_plugin" in p) for p in host.problems())
