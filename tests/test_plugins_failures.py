"""Broken third-party plugins, installed through real ``mecha`` entry points, never break commands
that do not use them; commands that reach them fail in one line naming the plugin.

The fixtures (tests/fixtures/plugins/): ``listkeys`` (an architecture whose keys are a list),
``exitimport`` (sys.exit() at import), ``badconverter`` (a converter whose plan raises KeyError),
``exiting`` (a method raising SystemExit), ``baddetect`` (a detector that raises).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core
from mecha_core.cli import app
from mecha_core.errors import PluginCodeError
from mecha_core.plugins import get_host
from mecha_core.testing import install_plugin, write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
FIXTURE_MODULES = sorted(p.stem for p in FIXTURES.glob("mecha_*.py"))
BROKEN = {  # entry-point name -> fixture module
    "listkeys": "mecha_listkeys_plugin",
    "exitimport": "mecha_exit_at_import_plugin",
    "badconverter": "mecha_badconverter_plugin",
    "exiting": "mecha_exiting_plugin",
    "baddetect": "mecha_baddetect_plugin",
}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Every broken fixture installed beside the builtins (on sys.path and PYTHONPATH)."""
    folder = tmp_path / "site"
    folder.mkdir()
    for entry, module in BROKEN.items():
        install_plugin(folder, FIXTURES / f"{module}.py", entry=entry, dist=f"mecha-{entry}")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    for var in ("MECHA_LOAD_PLUGINS", "MECHA_DISABLE_PLUGINS", "MECHA_STRICT_PLUGINS", "MECHA_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    yield folder
    for name in FIXTURE_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def records() -> dict[str, object]:
    return {r.name: r for r in get_host().records}


def two_checkpoints(folder: Path) -> tuple[str, str, dict[str, list], dict[str, list]]:
    a = {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5, -0.5]}
    b = {"w": [[10.0, 20.0], [30.0, 40.0]], "b": [1.5, 2.5]}
    pa = write_checkpoint(folder / "a.safetensors", {k: torch.tensor(v) for k, v in a.items()})
    pb = write_checkpoint(folder / "b.safetensors", {k: torch.tensor(v) for k, v in b.items()})
    return pa, pb, a, b


def lerp(x, y, alpha):
    """weighted_sum computed by hand, element by element, on nested lists."""
    if isinstance(x, list):
        return [lerp(u, v, alpha) for u, v in zip(x, y)]
    return x * (1 - alpha) + y * alpha


def test_load_time_failures_are_one_line_errors_and_the_rest_load(site):
    found = records()
    assert (found["listkeys"].status, found["listkeys"].error) == (
        "error", "architecture 'listy': keys must be a mapping of key name to KeySpec, got list")
    assert found["listkeys"].provides == {}
    assert (found["exitimport"].status, found["exitimport"].error) == ("error", "SystemExit: 4")
    # the ones that fail only when their code runs load fine
    for name in ("badconverter", "exiting", "baddetect", "methods", "sd1", "lora"):
        assert found[name].status == "ok", (name, found[name].error)
    host = get_host()
    assert "listy" not in host.architectures.names()
    assert {"exit_now", "weighted_sum"} <= set(host.merge_methods.names())


def test_merges_of_other_files_still_work_and_a_raising_detector_warns_once(site, tmp_path, capsys):
    pa, pb, a, b = two_checkpoints(tmp_path)
    out = mecha_core.merge(mecha_core.weighted_sum(pa, pb, alpha=0.25), output=tmp_path / "o.safetensors")
    merged = load_file(out)
    assert sorted(merged) == ["b", "w"]
    for key in ("w", "b"):
        assert merged[key].tolist() == lerp(a[key], b[key], 0.25)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [  # two files read, one warning
        "warning: plugin 'baddetect': model type 'touchy': detect raised KeyError: 'no_such_key' while "
        "reading a.safetensors; treating files as not of this type"]


def test_a_converter_that_raises_is_one_line_naming_plugin_converter_and_file(site, tmp_path):
    pa, _, _, _ = two_checkpoints(tmp_path)
    lora = write_checkpoint(tmp_path / "l.safetensors", {"w.lora_down": torch.ones(1, 2)})
    with pytest.raises(PluginCodeError) as err:
        mecha_core.merge(mecha_core.add_difference(pa, lora, alpha=1.0), output=tmp_path / "o.safetensors")
    assert str(err.value) == ("plugin 'badconverter': converter 'bad-lora-to-delta' raised KeyError: "
                              "'w.lora_up' while reading l.safetensors")
    assert isinstance(err.value.__cause__, KeyError)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_method_raising_system_exit_is_one_line_and_writes_nothing(site, tmp_path):
    pa, _, _, _ = two_checkpoints(tmp_path)
    with pytest.raises(PluginCodeError) as err:
        mecha_core.merge(mecha_core.exit_now(pa), output=tmp_path / "o.safetensors")
    assert re.fullmatch(r"plugin 'exiting': method 'exit_now' failed on key '[^']+' \(file a\.safetensors\): "
                        r"SystemExit: 3", str(err.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "site"]


def test_inspect_and_plugins_commands(site, tmp_path):
    pa, _, _, _ = two_checkpoints(tmp_path)
    lora = write_checkpoint(tmp_path / "l.safetensors", {"w.lora_down": torch.ones(1, 2)})
    runner = CliRunner()
    inspected = runner.invoke(app, ["inspect", pa, "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    assert (summary["type"], summary["keys"], summary["dtypes"]) == ("base", 2, {"float32": 2})
    assert [line for line in inspected.stderr.splitlines() if "baddetect" in line] == [
        "warning: plugin 'baddetect': model type 'touchy': detect raised KeyError: 'no_such_key' while "
        "reading a.safetensors; treating files as not of this type"]
    # inspect only reads headers: the bad converter is not reached, the file's type is
    lora_summary = json.loads(runner.invoke(app, ["inspect", lora, "--json"]).stdout)
    assert lora_summary["type"] == "bad-lora"

    listed = runner.invoke(app, ["plugins", "list"])
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    for name, error in (("listkeys", "architecture 'listy': keys must be a mapping of key name to KeySpec, got list"),
                        ("exitimport", "SystemExit: 4")):
        row = next(i for i, line in enumerate(lines) if line.split()[0] == name)
        assert lines[row].split()[3] == "error"
        assert lines[row + 1] == f"    error: {error}"
    checked = runner.invoke(app, ["plugins", "check"])
    assert checked.exit_code == 2
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem:")]
    assert problems == [
        "problem: plugin 'exitimport': SystemExit: 4",
        "problem: plugin 'listkeys': architecture 'listy': keys must be a mapping of key name to KeySpec, got list"]


def test_the_command_line_prints_one_line_and_debug_the_traceback(site, tmp_path):
    two_checkpoints(tmp_path)
    write_checkpoint(tmp_path / "l.safetensors", {"w.lora_down": torch.ones(1, 2)})
    recipe = tmp_path / "r.mecha"
    recipe.write_text('mecha 1\na = model("a.safetensors")\nl = model("l.safetensors")\n'
                      'out = add_difference(a, l, alpha=1.0)\n')
    cmd = [sys.executable, "-m", "mecha_core"]
    plain = subprocess.run([*cmd, "merge", str(recipe), "-o", str(tmp_path / "o.safetensors")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.splitlines()[-1] == (  # where the recipe names the file, then what failed
        f"error: {recipe}:3:5: plugin 'badconverter': converter 'bad-lora-to-delta' raised KeyError: 'w.lora_up' while "
        "reading l.safetensors")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "--debug", "merge", str(recipe), "-o", str(tmp_path / "o.safetensors")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "in _plan" in debug.stderr  # the plugin's own frame
    assert not (tmp_path / "o.safetensors").exists()


def test_a_refusal_that_led_to_another_architecture_is_named_in_the_mismatch(tmp_path):
    """A converter's ValueError means "not for this file"; when a bug raises one and another
    converter reads the file as another architecture, the mismatch error says which refused."""
    import mecha_methods.plugin
    from mecha_core.errors import PlanError
    from mecha_core.plugins import plugin_from_functions
    from mecha_core.specs import Architecture, ConvertedKey, Converter, KeySpec, ModelType, TensorInfo
    from mecha_core.testing import using

    def arch(name):
        return Architecture(name, {"w": KeySpec((2,), "float32", "body"),
                                   f"{name}.only": KeySpec((1,), "float32", "body")})

    def buggy(header):
        raise ValueError("bug: unexpected rank")

    def to_tb(header):
        return {"w": ConvertedKey(TensorInfo((2,), "float32"), ("w.lora",), compute=lambda t: t["w.lora"])}

    plugin = plugin_from_functions(
        "tiny", mecha_architectures=lambda: [arch("ta"), arch("tb")],
        mecha_model_types=lambda: [ModelType("tl", "delta", detect=lambda keys: "w.lora" in keys)],
        mecha_converters=lambda: [Converter("tl-to-ta", None, "tl", "ta", "delta", plan=buggy),
                                  Converter("tl-to-tb", None, "tl", "tb", "delta", plan=to_tb)])
    base = write_checkpoint(tmp_path / "base.safetensors", {"w": torch.ones(2), "ta.only": torch.ones(1)})
    lora = write_checkpoint(tmp_path / "l.safetensors", {"w.lora": torch.ones(2)})
    with using(mecha_methods.plugin, plugin):
        with pytest.raises(PlanError) as err:
            mecha_core.merge(mecha_core.add_difference(base, lora), output=tmp_path / "o.safetensors")
    assert str(err.value).endswith(
        "base.safetensors is ta, l.safetensors is tb; if one was detected wrongly, name it with "
        "model(..., arch=...) (before that, converter 'tl-to-ta' of plugin 'tiny' does not apply: "
        "bug: unexpected rank)")


def test_keyboard_interrupt_from_plugin_code_always_propagates(tmp_path):
    from mecha_core.engine.sources import detect_type
    from mecha_core.plugins import plugin_from_functions
    from mecha_core.specs import ModelType
    from mecha_core.testing import host_with

    def interrupted(keys):
        raise KeyboardInterrupt

    host = host_with(plugin_from_functions("ctrlc", mecha_model_types=lambda: [ModelType("t", "delta", interrupted)]))
    with pytest.raises(KeyboardInterrupt):
        detect_type("a.safetensors", frozenset({"w"}), host)

    def hook():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not recorded as a broken plugin: the user asked to stop
        host_with(plugin_from_functions("ctrlc", mecha_merge_methods=hook), strict=False)
