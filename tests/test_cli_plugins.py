"""``mecha --version``, ``mecha plugins list|check`` and ``mecha methods`` through typer's runner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from importlib_metadata import version
from typer.testing import CliRunner

from mecha_core.cli import app
from mecha_core.errors import MechaError, PluginCodeError, RecipeError
from mecha_core.method import merge_method
from mecha_core.plugins import plugin_from_functions
from mecha_core.specs import CliCommand
from mecha_core.testing import host_with, using

BUILTINS = {"methods": "mecha-methods", "sd1": "mecha-sd1", "sdxl": "mecha-sdxl", "sd3": "mecha-sd3",
            "flux": "mecha-flux", "gguf": "mecha-gguf", "lora": "mecha-lora", "llm": "mecha-llm",
            "sdmecha": "mecha-sdmecha", "mergekit": "mecha-mergekit"}


@pytest.fixture
def runner(monkeypatch):
    for var in ("MECHA_LOAD_PLUGINS", "MECHA_DISABLE_PLUGINS", "MECHA_STRICT_PLUGINS", "MECHA_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return CliRunner()


@merge_method
def blend(a, b, *, alpha: float = 0.25, steps: int = 3):
    """Blend a and b by alpha, in steps.

    A second paragraph shown only in full.
    """
    return a


def boom():
    raise RuntimeError("boom")


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"mecha {version('mecha-core')}\n"


def test_python_dash_m_version():
    done = subprocess.run([sys.executable, "-m", "mecha_core", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout) == (0, f"mecha {version('mecha-core')}\n"), done.stderr


def test_plugins_list_json_shows_the_installed_builtins(runner):
    result = runner.invoke(app, ["plugins", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert set(BUILTINS) <= set(by_name)
    for name, dist in BUILTINS.items():
        row = by_name[name]
        assert {"name", "distribution", "version", "status", "error", "provides"} <= set(row)
        assert (row["distribution"], row["version"], row["status"], row["error"]) == (dist, version(dist), "ok", None)
        assert row["module"] == f"mecha_{name}.plugin"
    provided = set(by_name["methods"]["provides"]["merge_methods"])
    assert {"weighted_sum", "add_difference", "ties"} <= provided
    assert not provided & {"subtract", "add", "scale", "fallback"}  # the core's own operators


def test_plugins_list_text_and_verbose(runner):
    with using(host_with(plugin_from_functions("mine", mecha_merge_methods=lambda: [blend]))):
        plain = runner.invoke(app, ["plugins", "list"])
        verbose = runner.invoke(app, ["plugins", "list", "-v"])
    assert plain.exit_code == verbose.exit_code == 0
    lines = plain.stdout.splitlines()
    assert lines[0].split() == ["name", "distribution", "version", "status", "provides"]
    assert lines[1].split() == ["mine", "-", "-", "ok", "1", "merge", "method"]
    assert len(lines) == 2
    assert "    merge methods: blend" in verbose.stdout.splitlines()


def test_plugins_list_exits_0_with_a_broken_plugin_and_check_exits_non_zero(runner):
    good = plugin_from_functions("good", mecha_merge_methods=lambda: [blend])
    bad = plugin_from_functions("bad", mecha_merge_methods=boom)
    with using(host_with(good, bad, strict=False)):
        listed = runner.invoke(app, ["plugins", "list", "--json"])
        text = runner.invoke(app, ["plugins", "list"])
        checked = runner.invoke(app, ["plugins", "check"])
        methods = runner.invoke(app, ["methods", "--json"])
    assert listed.exit_code == 0 and text.exit_code == 0
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert (rows["bad"]["status"], rows["bad"]["error"]) == ("error", "mecha_merge_methods() raised RuntimeError: boom")
    assert rows["good"]["status"] == "ok"
    assert "    error: mecha_merge_methods() raised RuntimeError: boom" in text.stdout.splitlines()
    assert checked.exit_code == 2
    assert checked.stderr.splitlines() == [
        "problem: plugin 'bad': mecha_merge_methods() raised RuntimeError: boom",
        "error: 1 plugin problem; `mecha plugins list` shows every plugin"]
    # the rest keep working (beside the core's own operators)
    assert [m["name"] for m in json.loads(methods.stdout)] == ["add", "blend", "fallback", "scale", "subtract"]


def test_plugins_check_passes_on_the_installed_builtins(runner):
    result = runner.invoke(app, ["plugins", "check"])
    assert (result.exit_code, result.stdout) == (0, "all plugins ok\n"), result.output


def test_plugins_check_reports_a_name_claimed_twice(runner):
    first = plugin_from_functions("first", mecha_merge_methods=lambda: [blend])
    second = plugin_from_functions("second", mecha_merge_methods=lambda: [blend])
    with using(host_with(first, second, strict=False)):
        checked = runner.invoke(app, ["plugins", "check"])
        used = runner.invoke(app, ["methods", "blend"])
    assert checked.exit_code == 2
    assert "problem: merge method 'blend' is provided by plugin 'first' and plugin 'second'" in checked.stderr
    assert used.exit_code == 2
    assert used.stderr == ("error: merge method 'blend' is provided by both plugin 'first' and plugin 'second'; "
                           "disable one with MECHA_DISABLE_PLUGINS\n")


def test_methods_lists_every_method_with_defaults(runner):
    with using(host_with(plugin_from_functions("mine", mecha_merge_methods=lambda: [blend]))):
        listed = runner.invoke(app, ["methods"])
        one = runner.invoke(app, ["methods", "blend"])
        as_json = runner.invoke(app, ["methods", "blend", "--json"])
    assert listed.exit_code == one.exit_code == as_json.exit_code == 0
    lines = listed.stdout.splitlines()
    at = lines.index("blend(a, b, *, alpha=0.25, steps=3) -> same space as inputs")
    assert lines[at + 1] == "    Blend a and b by alpha, in steps."
    # the core's operators are listed too, by name: add, blend, fallback, scale, subtract
    assert [ln.partition("(")[0] for ln in lines if not ln.startswith(" ")] == [
        "add", "blend", "fallback", "scale", "subtract"]
    assert "  A second paragraph shown only in full." in one.stdout.splitlines()
    assert "  plugin: mine" in one.stdout.splitlines()
    data = json.loads(as_json.stdout)
    assert data["name"] == "blend" and data["plugin"] == "mine"
    assert data["inputs"] == [{"name": "a", "space": None, "optional": False, "variadic": False},
                              {"name": "b", "space": None, "optional": False, "variadic": False}]
    assert data["hyperparameters"] == [{"name": "alpha", "default": 0.25, "type": "float"},
                                       {"name": "steps", "default": 3, "type": "int"}]
    assert data["doc"].startswith("Blend a and b by alpha, in steps.")


def test_methods_json_lists_the_installed_builtin_methods(runner):
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    by_name = {m["name"]: m for m in json.loads(result.stdout)}
    assert by_name["weighted_sum"]["plugin"] == "methods"
    assert by_name["weighted_sum"]["hyperparameters"] == [{"name": "alpha", "default": 0.5, "type": "float"}]


def test_the_error_boundary_prints_one_line_and_exits_2(runner, monkeypatch):
    result = runner.invoke(app, ["methods", "weighted_summ"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: unknown merge method 'weighted_summ'; did you mean 'weighted_sum'?\n"
    monkeypatch.setenv("MECHA_DEBUG", "1")  # a traceback instead, for whoever debugs
    debug = runner.invoke(app, ["methods", "weighted_summ"])
    assert isinstance(debug.exception, RecipeError)


# -- commands from plugins (mecha_cli_commands) ------------------------------------------------------
def greeter_app() -> typer.Typer:
    greeter = typer.Typer(help="Say things.")

    @greeter.command("greet")
    def greet(name: str, times: int = 1) -> None:
        """Greet NAME."""
        typer.echo(" ".join([f"hello {name}"] * times))

    @greeter.command("fail")
    def fail(kind: str) -> None:
        """Fail on purpose."""
        if kind == "mecha":
            raise MechaError("the greeting file is missing")
        raise RuntimeError("greeter broke\nover two lines")

    return greeter


def command_plugin(name: str, *commands: CliCommand):
    return plugin_from_functions(name, mecha_cli_commands=lambda: list(commands))


def test_a_plugin_command_is_mounted_listed_and_runs(runner):
    plugin = command_plugin("greeter", CliCommand("greeter", app=greeter_app(), help="Greet people."))
    with using(host_with(plugin)):
        ran = runner.invoke(app, ["greeter", "greet", "ada", "--times", "2"])
        helped = runner.invoke(app, ["--help"])
        listed = runner.invoke(app, ["plugins", "list", "--json"])
    assert (ran.exit_code, ran.stdout) == (0, "hello ada hello ada\n"), ran.output
    assert "Greet people." in helped.stdout and "merge" in helped.stdout
    assert json.loads(listed.stdout)[0]["provides"] == {"cli_commands": ["greeter"]}


def test_a_plugin_command_that_raises_prints_one_line_naming_the_plugin(runner, monkeypatch):
    plugin = command_plugin("greeter", CliCommand("greeter", app=greeter_app(), help="Greet people."))
    with using(host_with(plugin)):
        broken = runner.invoke(app, ["greeter", "fail", "other"])
        refused = runner.invoke(app, ["greeter", "fail", "mecha"])
        monkeypatch.setenv("MECHA_DEBUG", "1")
        debug = runner.invoke(app, ["greeter", "fail", "other"])
    assert broken.exit_code == 2
    assert broken.stderr == ("error: plugin 'greeter': command 'mecha greeter' raised RuntimeError: "
                             "greeter broke over two lines\n")
    assert (refused.exit_code, refused.stderr) == (2, "error: the greeting file is missing\n")
    assert isinstance(debug.exception, PluginCodeError)
    assert isinstance(debug.exception.__cause__, RuntimeError)


def test_a_command_named_like_a_core_command_or_not_an_app_is_a_plugin_error(runner):
    clash = command_plugin("clash", CliCommand("merge", app=greeter_app()))
    junk = command_plugin("junk", CliCommand("junk", app=print))
    with using(host_with(clash, junk, strict=False)):
        listed = runner.invoke(app, ["plugins", "list", "--json"])
        merged = runner.invoke(app, ["merge", "--help"])
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert (rows["clash"]["status"], rows["clash"]["error"]) == (
        "error", "cli command 'merge' conflicts with the core command 'mecha merge'; choose another name")
    assert (rows["junk"]["status"], rows["junk"]["error"]) == (
        "error", "cli command 'junk': app must be a typer.Typer, got builtin_function_or_method")
    assert merged.exit_code == 0 and "Run a recipe" in merged.stdout  # the core's merge, untouched


def test_a_command_name_claimed_by_two_plugins_mounts_neither(runner):
    first = command_plugin("first", CliCommand("greeter", app=greeter_app()))
    second = command_plugin("second", CliCommand("greeter", app=greeter_app()))
    with using(host_with(first, second, strict=False)):
        ran = runner.invoke(app, ["greeter", "greet", "ada"])
        checked = runner.invoke(app, ["plugins", "check"])
    assert ran.exit_code == 2 and "No such command" in ran.output
    assert "problem: cli command 'greeter' is provided by plugin 'first' and plugin 'second'" in checked.stderr


def test_core_commands_do_not_look_plugin_commands_up(runner, monkeypatch):
    app_module = sys.modules["mecha_core.cli.app"]  # (mecha_core.cli.app is also the Typer object's name)

    def looked_up():
        raise AssertionError("plugin commands looked up")

    monkeypatch.setattr(app_module, "_plugin_cli_commands", looked_up)
    with using(host_with(plugin_from_functions("mine", mecha_merge_methods=lambda: [blend]))):
        assert runner.invoke(app, ["methods"]).exit_code == 0
        assert runner.invoke(app, ["plugins", "list"]).exit_code == 0
        helped = runner.invoke(app, ["--help"])  # the full help does list them
    assert isinstance(helped.exception, AssertionError)
