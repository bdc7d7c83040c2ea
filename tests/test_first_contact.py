"""First contact (issue 13): what a new user meets first. Install hints for names a builtin
distribution provides, exit codes, JSON results and errors, the -p forms, the output extension,
work dtypes, start-up without torch, Ctrl-C while starting, and help text."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError

import pytest
import torch
from typer.testing import CliRunner

import mecha_methods.plugin
from mecha_core.builtin_plugins import BUILTIN_PROVIDERS, install_hint, provider_of
from mecha_core.cli import app
from mecha_core.cli.app import run
from mecha_core.engine.safetensors_io import tensor_bytes
from mecha_core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from mecha_core.method import merge_method
from mecha_core.plugins import PluginHost, plugin_from_functions
from mecha_core.testing import host_with, read_tensors, using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: moving into the core (issue 12): not in the table
CORE_BOUND = {"subtract", "add", "scale", "fallback"}
RECIPE = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b, alpha=0.25)\n'


@pytest.fixture
def work(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0, 4.0]), "v": torch.tensor([8.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([5.0, 6.0, 0.0]), "v": torch.tensor([0.0])})
    (tmp_path / "recipe.mecha").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    for var in ("MECHA_LOAD_PLUGINS", "MECHA_DISABLE_PLUGINS", "MECHA_STRICT_PLUGINS", "MECHA_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    with using(mecha_methods.plugin):
        yield tmp_path


# -- which distribution provides a name -----------------------------------------------------------
def test_the_builtin_table_matches_what_the_installed_builtins_provide():
    host = PluginHost(strict=True)
    provided: dict[str, dict[str, set[str]]] = {}
    for record in host.records:
        if record.distribution not in BUILTIN_PROVIDERS:
            continue
        kinds = provided.setdefault(record.distribution, {})
        for name in record.provides.get("merge_methods", []):
            if name not in CORE_BOUND:
                kinds.setdefault("merge method", set()).add(name)
        for name in record.provides.get("architectures", []):
            kinds.setdefault("architecture", set()).update({name, *host.architecture(name).aliases})
        for name in record.provides.get("architecture_families", []):
            kinds.setdefault("architecture", set()).add(name)
        for name in record.provides.get("model_types", []):
            kinds.setdefault("model type", set()).add(name)
        for name in record.provides.get("recipe_formats", []):
            kinds.setdefault("recipe format", set()).add(name)
        for name in record.provides.get("executors", []):
            kinds.setdefault("executor", set()).add(name)
    assert provided == {dist: {kind: set(names) for kind, names in table.items()}
                        for dist, table in BUILTIN_PROVIDERS.items()}


def _uninstalled(monkeypatch, *distributions: str) -> None:
    """Make importlib.metadata report ``distributions`` as not installed."""
    import importlib.metadata as metadata

    real = metadata.distribution

    def distribution(name):
        if name in distributions:
            raise PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)


@pytest.mark.parametrize("recipe,fragment", [
    (RECIPE, "unknown merge method 'weighted_sum': it is in mecha-methods: pip install mecha-methods"),
    ('mecha 1\nmodel("a.safetensors", arch="sdxl")\n',
     "unknown architecture 'sdxl': it is in mecha-sdxl: pip install mecha-sdxl"),
    ('mecha 1\nmodel("a.safetensors", type="kohya-lora")\n',
     "unknown model type 'kohya-lora': it is in mecha-lora: pip install mecha-lora"),
])
def test_a_name_from_a_missing_builtin_says_what_to_install(tmp_path, monkeypatch, recipe, fragment):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    (tmp_path / "r.mecha").write_text(recipe)
    _uninstalled(monkeypatch, "mecha-methods", "mecha-sdxl", "mecha-lora")
    before = snapshot(tmp_path)
    with using(host_with()):  # the core alone
        result = runner.invoke(app, ["merge", str(tmp_path / "r.mecha"), "-o", str(tmp_path / "o.safetensors")])
    check_clean_failure(result.exit_code, result.stderr, folder=tmp_path, before=before, fragments=(fragment,))


def test_no_install_hint_for_an_installed_distribution_or_an_unknown_name(monkeypatch):
    assert install_hint("merge method", "weighted_sum") == ""  # installed here: disabled, not missing
    assert install_hint("merge method", "no_such_method") == ""
    assert provider_of("architecture", "sd1.5") == "mecha-sd1"
    _uninstalled(monkeypatch, "mecha-sd1")
    assert install_hint("architecture", "sd1.5") == ": it is in mecha-sd1: pip install mecha-sd1"


# -- exit codes and JSON errors -----------------------------------------------------------------
def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_click_usage_error_exits_2_with_a_json_error(work, capsys):
    code, out, err = _run(capsys, "merge", "recipe.mecha", "-o", "m.safetensors", "--json", "--no-such-option")
    assert code == EXIT_USAGE
    error = json.loads(out)
    assert error["kind"] == "UsageError" and "--no-such-option" in error["error"]
    assert "--no-such-option" in err


def test_a_recipe_error_exits_2_with_file_and_line_in_json(work, capsys):
    (work / "bad.mecha").write_text('mecha 1\na = model("a.safetensors")\nnope(a)\n')
    code, out, err = _run(capsys, "merge", "bad.mecha", "-o", "m.safetensors", "--json")
    assert code == EXIT_USAGE
    error = json.loads(out)
    assert (error["kind"], error["line"]) == ("RecipeError", 3)
    assert error["file"].endswith("bad.mecha") and "unknown merge method 'nope'" in error["error"]
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (work / "m.safetensors").exists()


def test_nan_found_while_merging_exits_1_with_a_json_error(work, capsys):
    write_checkpoint(work / "a.safetensors", {"w": torch.tensor([1.0, float("nan"), 4.0]), "v": torch.tensor([8.0])})
    before = snapshot(work)
    code, out, err = _run(capsys, "merge", "recipe.mecha", "-o", "m.safetensors", "--json", "-q")
    assert code == EXIT_FAILED
    error = json.loads(out)
    assert error["kind"] == "MergeError" and "NaN" in error["error"] and error["file"] is None
    check_clean_failure(code, err, folder=work, before=before, fragments=("'w'", "NaN"), code=1)


@merge_method
def explodes(a, b):
    raise RuntimeError("kaboom")


def test_a_method_failing_exits_1(work):
    (work / "boom.mecha").write_text('mecha 1\nexplodes(model("a.safetensors"), model("b.safetensors"))\n')
    before = snapshot(work)
    with using(host_with(plugin_from_functions("boom", mecha_merge_methods=lambda: [explodes]))):
        result = runner.invoke(app, ["merge", "boom.mecha", "-o", "m.safetensors", "-q"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("kaboom",), code=1)


def test_a_bad_input_file_found_before_the_merge_exits_2(work):
    (work / "b.safetensors").write_bytes(b"not a model at all")
    before = snapshot(work)
    result = runner.invoke(app, ["merge", "recipe.mecha", "-o", "m.safetensors", "-q"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("b.safetensors",))


def test_interrupt_during_a_command_prints_a_json_error(work, monkeypatch, capsys):
    import mecha_core.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mecha_core.api, "merge", interrupted)
    code, out, err = _run(capsys, "merge", "recipe.mecha", "-o", "m.safetensors", "--json")
    assert code == EXIT_INTERRUPTED
    assert json.loads(out) == {"error": "interrupted", "kind": "KeyboardInterrupt", "file": None, "line": None}
    assert "interrupted" in err


# -- --json on every command that prints results ------------------------------------------------
def test_plugins_check_json(work, capsys):
    code, out, _ = _run(capsys, "plugins", "check", "--json")
    assert (code, json.loads(out)) == (0, {"ok": True, "problems": [], "warnings": []})


def test_plugins_check_json_with_a_problem_prints_one_document(work, capsys):
    def boom():
        raise RuntimeError("boom")

    with using(host_with(plugin_from_functions("bad", mecha_merge_methods=boom), strict=False)):
        code, out, err = _run(capsys, "plugins", "check", "--json")
    assert code == EXIT_USAGE
    assert json.loads(out) == {"ok": False,
                               "problems": ["plugin 'bad': mecha_merge_methods() raised RuntimeError: boom"],
                               "warnings": []}
    assert err.splitlines()[-1] == "error: 1 plugin problem; `mecha plugins list` shows every plugin"


def test_recipe_show_json(work, capsys):
    assert run(["merge", "recipe.mecha", "-o", "m.safetensors", "-q"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "recipe", "show", "m.safetensors", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["file"] == "m.safetensors"
    assert "weighted_sum(a, b, alpha=0.25)" in shown["recipe"] and shown["mecha_plugins"] == {"methods": "0.1.0"}
    code, out, _ = _run(capsys, "recipe", "show", "a.safetensors", "--json")
    assert code == EXIT_USAGE and json.loads(out)["kind"] == "RecipeError"


# -- -p: one form for merge and compose ---------------------------------------------------------
TEMPLATE = ('mecha 1\nbase = parameter("base")\nk = parameter("k")\n'
            'weighted_sum(base, model("b.safetensors"), alpha=k)\n')


@pytest.mark.parametrize("fills", [
    ["-p", "base=a.safetensors", "-p", "k=0.25"],
    ["-p", "base", "a.safetensors", "-p", "k", "0.25"],
    ["--param=base=a.safetensors", "-p", "k=0.25"],
])
def test_compose_takes_the_same_p_form_as_merge(work, capsys, fills):
    (work / "t.mecha").write_text(TEMPLATE)
    code, out, _ = _run(capsys, "compose", "t.mecha", *fills, "-o", "c.mecha", "--json")
    assert code == 0
    composed = json.loads(out)
    assert composed["output"] == str(work / "c.mecha")
    assert composed["recipe"] == (work / "c.mecha").read_text()
    # merge fills the same template with the same -p NAME=VALUE: the two outputs are equal
    assert run(["merge", "c.mecha", "-o", "composed.safetensors", "-q"]) == 0
    assert run(["merge", "t.mecha", "-p", "base=a.safetensors", "-p", "k=0.25", "-o", "direct.safetensors", "-q"]) == 0
    assert (work / "composed.safetensors").read_bytes() == (work / "direct.safetensors").read_bytes()
    merged = read_tensors(work / "direct.safetensors")
    assert merged["w"].tolist() == [0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * 6, 0.75 * 4]


# -- the output's extension ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["merged.ckpt", "merged.pt", "merged", "merged.safetensor"])
def test_an_output_merge_would_mislabel_is_refused_before_any_work(work, name):
    before = snapshot(work)
    result = runner.invoke(app, ["merge", "no_such_recipe.mecha", "-o", name, "-q"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=(name, "safetensors (.safetensors)"))


def test_the_api_refuses_the_extension_too(work):
    from mecha_core.api import merge
    from mecha_core.errors import OutputError

    with pytest.raises(OutputError, match=r"merged\.ckpt: mecha writes safetensors \(\.safetensors\) files only"):
        merge(RECIPE, work / "merged.ckpt")
    assert not (work / "merged.ckpt").exists()


def test_an_uppercase_extension_is_a_safetensors_name(work):
    assert run(["merge", "recipe.mecha", "-o", "M.SAFETENSORS", "-q"]) == 0
    assert read_tensors(work / "M.SAFETENSORS")["v"].tolist() == [6.0]


def test_compose_writes_mecha_files_only(work):
    (work / "t.mecha").write_text(TEMPLATE)
    before = snapshot(work)
    result = runner.invoke(app, ["compose", "t.mecha", "-o", "c.safetensors"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=(".mecha",))


# -- work dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "int8", "float"])
def test_a_work_dtype_that_cannot_compute_is_refused_in_one_line(work, dtype):
    before = snapshot(work)
    result = runner.invoke(app, ["merge", "recipe.mecha", "-o", "m.safetensors", "--work-dtype", dtype])
    message = check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                                  fragments=(f"--work-dtype {dtype}", "on cpu"), max_lines=1)
    assert message.endswith("use one of float32, float64, float16, bfloat16")


def test_float8_stays_an_output_dtype(work):
    assert run(["merge", "recipe.mecha", "-o", "m.safetensors", "-q", "--output-dtype", "float8_e4m3fn"]) == 0
    merged = read_tensors(work / "m.safetensors")
    assert merged["w"].dtype == torch.float8_e4m3fn
    # 0.75 a + 0.25 b, all exactly representable in float8 e4m3
    assert merged["w"].float().tolist() == [2.0, 3.0, 3.0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_the_offered_work_dtypes_compute_on_cpu(work, dtype):
    assert run(["merge", "recipe.mecha", "-o", "m.safetensors", "-q", "--work-dtype", dtype]) == 0
    assert read_tensors(work / "m.safetensors")["w"].tolist() == [2.0, 3.0, 3.0]


# -- numpy is not needed --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "<f"), (torch.float64, "<d"), (torch.int64, "<q"),
                                       (torch.int16, "<h"), (torch.uint8, "<B")])
def test_tensor_bytes_are_the_little_endian_values(dtype, fmt):
    values = [3, 1, 4, 1, 5, 9, 2, 6]
    t = torch.tensor(values, dtype=dtype).reshape(2, 4).t()  # not contiguous
    expected = b"".join(struct.pack(fmt, v) for v in [3, 5, 1, 9, 4, 2, 1, 6])
    data = tensor_bytes(t)
    assert (bytes(data), data.format, data.nbytes) == (expected, "B", len(expected))


def test_tensor_bytes_keep_the_tensor_alive():
    data = tensor_bytes(torch.full((1000,), 2.5) * 1)  # the only reference to the result
    import gc

    gc.collect()
    torch.full((1000,), 7.0) * 1  # would reuse the freed memory
    assert bytes(data[-4:]) == struct.pack("<f", 2.5)


NO_NUMPY = """
import sys
sys.modules["numpy"] = None  # as in an environment where numpy is not installed
sys.argv = ["mecha", *sys.argv[1:]]
from mecha_core.__main__ import main
sys.exit(main())
"""


def test_a_merge_without_numpy_works_and_prints_no_numpy_warning(work):
    proc = subprocess.run([sys.executable, "-c", NO_NUMPY, "merge", "recipe.mecha", "-o", "m.safetensors"],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr and "numpy" not in proc.stderr, proc.stderr
    assert read_tensors(work / "m.safetensors")["w"].tolist() == [2.0, 3.0, 3.0]


# -- start-up: no torch for commands that read no tensors --------------------------------------
IMPORTS = """
import json, sys
sys.argv = ["mecha", *sys.argv[1:]]
from mecha_core.__main__ import main
code = main()
sys.stdout.flush()
print("\\nIMPORTED " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("command", [
    ["--help"], ["--version"], ["merge", "--help"], ["methods"], ["methods", "slerp"], ["info"],
    ["info", "sd1-ldm"], ["plugins", "list"], ["plugins", "check"], ["recipe", "show", "merged.safetensors"],
    ["compose", "t.mecha", "-p", "base=a.safetensors", "-p", "k=0.5", "-o", "c.mecha"],
])
def test_commands_that_read_no_tensors_do_not_import_torch(work, command):
    assert run(["merge", "recipe.mecha", "-o", "merged.safetensors", "-q"]) == 0
    (work / "t.mecha").write_text(TEMPLATE)
    proc = subprocess.run([sys.executable, "-c", IMPORTS, *command], capture_output=True, text=True,
                          timeout=300, cwd=work)
    report = json.loads(proc.stdout.rsplit("IMPORTED ", 1)[1])
    assert report == {"code": 0, "torch": False}, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_merge_does_import_torch(work):
    """The check above can fail: the same probe sees torch after a merge."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS, "merge", "recipe.mecha", "-o", "m.safetensors", "-q"],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert json.loads(proc.stdout.rsplit("IMPORTED ", 1)[1]) == {"code": 0, "torch": True}, proc.stderr


# -- Ctrl-C and SIGTERM while starting --------------------------------------------------------------
def _signal_while_importing(work, signum: int) -> subprocess.CompletedProcess:
    """Run `python -m mecha_core merge` and send ``signum`` once torch's shared library is mapped
    (so mid-way through importing torch, long before any tensor is read)."""
    proc = subprocess.Popen([sys.executable, "-m", "mecha_core", "merge", "recipe.mecha", "-o", "m.safetensors"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/maps") as maps:
                if "libtorch" in maps.read():
                    break
        except OSError:
            pass
        time.sleep(0.002)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see torch loading")
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)])
def test_a_signal_during_start_up_exits_cleanly(work, signum, code):
    done = _signal_while_importing(work, signum)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (work / "m.safetensors").exists()


# -- help text --------------------------------------------------------------------------------------
HELP_COMMANDS = [[], ["merge"], ["compose"], ["methods"], ["info"], ["inspect"], ["plugins"], ["plugins", "list"],
                 ["plugins", "check"], ["recipe"], ["recipe", "show"]]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_reads_as_plain_text(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    text = result.stdout
    assert "<bool>" not in text and "``" not in text and "(s)" not in text, text
    assert not any(c in text for c in "╭│╰─"), text  # no boxes


def test_help_documents_the_exit_codes():
    text = runner.invoke(app, ["--help"]).stdout
    for line in ("0    success", "1    the merge failed", "2    bad usage", "130  interrupted", "143  terminated"):
        assert line in text, text


def test_counts_take_the_singular_for_one(work):
    from mecha_core.specs import Architecture, KeySpec

    arch = Architecture(name="tiny", description="one key",
                        keys={"w": KeySpec(shape=(2,), dtype="float32", component="main")})
    with using(host_with(plugin_from_functions("tiny", mecha_architectures=lambda: [arch]))):
        listed = runner.invoke(app, ["plugins", "list"]).stdout
        described = runner.invoke(app, ["info", "tiny", "-v"]).stdout
        short = runner.invoke(app, ["info"]).stdout
    assert listed.splitlines()[1].split()[-2:] == ["1", "architecture"]
    assert "component main (1 key):" in described
    assert short.split()[:3] == ["tiny", "1", "key"]


def test_the_readme_install_line_installs_every_builtin():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith("pip install ./ "))
    installed = set(line.split()[2:])
    builtins = {f"./plugins/{name}" for name in os.listdir(os.path.join(ROOT, "plugins"))
                if os.path.exists(os.path.join(ROOT, "plugins", name, "pyproject.toml"))}
    assert installed == {"./"} | builtins
    assert {d.removeprefix("./plugins/") for d in builtins} == set(BUILTIN_PROVIDERS)
