"""Each builtin plugin loads alone (a host with only that plugin) and passes the plugin contract."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
from importlib_metadata import entry_points, packages_distributions, requires, version
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mecha_core.testing import check_plugin, host_with

BUILTINS = ["methods", "sd1", "sdxl", "sd3", "lora", "flux", "gguf", "llm"]
ROOT = Path(__file__).resolve().parents[1]
#: the core modules a plugin may import (its tests also mecha_core.testing)
PUBLIC_CORE = {"mecha_core", "mecha_core.specs", "mecha_core.errors", "mecha_core.kit", "mecha_core.lazy"}


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



# -- what the builtins import ------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, at any depth (function-level
    imports count too); ``from a import b`` gives ``a.b`` as well, since ``b`` may be a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _core_module(name: str) -> str | None:
    """The mecha_core module an import name reaches, to the depth the contract names modules:
    ``mecha_core.kit.layouts`` -> ``mecha_core.kit``, ``mecha_core.hookimpl`` (a name of the
    package, not a module) -> ``mecha_core``; ``None`` outside the core."""
    import mecha_core

    parts = name.split(".")
    if parts[0] != "mecha_core":
        return None
    # files and folders: some subpackages (engine) are namespace packages, which pkgutil skips
    submodules = {p.stem for p in Path(mecha_core.__file__).parent.iterdir()
                  if p.suffix == ".py" or (p.is_dir() and not p.name.startswith("__"))}
    return "mecha_core" if len(parts) == 1 or parts[1] not in submodules else ".".join(parts[:2])


def _reaches_outside(name: str, allowed: set[str]) -> bool:
    module = _core_module(name)
    return module is not None and module not in allowed


@pytest.mark.parametrize("name", BUILTINS)
def test_a_builtin_imports_only_public_core_modules_and_no_other_plugin(name):
    others = {f"mecha_{b}" for b in BUILTINS if b != name}
    bad = []
    for path in sorted((ROOT / "plugins" / f"mecha-{name}" / f"mecha_{name}").rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] in others or _reaches_outside(module, PUBLIC_CORE):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert bad == []


@pytest.mark.parametrize("name", BUILTINS)
def test_a_builtins_tests_import_only_what_it_declares(name):
    """Each import of a plugin's tests is the standard library, the core, the plugin itself, or a
    distribution named in its dependencies or its ``test`` extra; other builtins only through
    their entry-point module (``mecha_methods.plugin``), never their internals."""
    dist = f"mecha-{name}"
    declared = {canonicalize_name(Requirement(r).name) for r in requires(dist) or []} | {dist, "mecha-core"}
    owners = packages_distributions()
    bad = []
    for path in sorted((ROOT / "plugins" / dist / "tests").rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}: {module}"
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if {canonicalize_name(d) for d in owners.get(top, [])}.isdisjoint(declared):
                bad.append(f"{where} (from {owners.get(top)}, not declared)")
            elif top.startswith("mecha_") and top not in ("mecha_core", f"mecha_{name}") and module.count(".") == 1 \
                    and module != f"{top}.plugin":
                bad.append(f"{where} (another plugin's internals)")
    assert bad == []


@pytest.mark.parametrize("name", BUILTINS)
def test_a_builtins_test_extra_is_installed_at_versions_it_accepts(name):
    extra = [Requirement(r) for r in requires(f"mecha-{name}") or [] if "extra ==" in r]
    assert extra, f"mecha-{name} declares no test extra"
    for req in extra:
        assert req.marker.evaluate({"extra": "test"}), str(req)
        assert req.specifier.contains(version(req.name), prereleases=True), (str(req), version(req.name))


def test_requirements_dev_installs_every_builtin_with_its_test_extra():
    lines = [line.strip() for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("torch==")  # pinned first: nothing may resolve another torch
    for name in BUILTINS:
        assert f"-e plugins/mecha-{name}[test]" in lines


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_sdxl_and_sd3_do_not_depend_on_sd1(name):
    runtime = [Requirement(r) for r in requires(f"mecha-{name}") or [] if "extra ==" not in r]
    assert "mecha-sd1" not in {canonicalize_name(r.name) for r in runtime}


# -- the architecture plugins install alone ----------------------------------------------------
# A sitecustomize that makes `mecha_sd1` (and its submodules) fail to import, as when the
# distribution is not installed; every other module imports as usual.
_WITHOUT_SD1 = '''
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "mecha_sd1" or name.startswith("mecha_sd1."):
            raise ImportError(f"No module named {name!r} (blocked by the test: mecha-sd1 not installed)")
        return None


sys.meta_path.insert(0, _NotInstalled())
'''

# Runs in the subprocess: merge two files with a block map, through the public API, with only
# the plugins MECHA_LOAD_PLUGINS names; prints the plugin statuses for the test to check.
_MERGE = '''
import json, sys
import mecha_core

a, b, out, arch, alpha = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
try:
    import mecha_sd1  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("mecha_sd1 imported: the blocker does not work")
recipe = mecha_core.weighted_sum(mecha_core.model(a, arch=arch), mecha_core.model(b, arch=arch),
                                 alpha=mecha_core.blocks(arch, **alpha))
mecha_core.merge(recipe, out)
print(json.dumps({r.name: r.status for r in mecha_core.get_host().records}))
'''


def _merge_without_sd1(tmp_path, plugins: str, a, b, arch: str, alpha: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_WITHOUT_SD1, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MECHA_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               MECHA_LOAD_PLUGINS=plugins)
    done = subprocess.run([sys.executable, "-c", _MERGE, str(a), str(b), str(tmp_path / "out.safetensors"), arch,
                           json.dumps(alpha)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sdxl_block(key: str) -> str:
    """The SDXL MBW block of an sgm key, written out from the block rules (not the plugin's data)."""
    import re

    if key.startswith("first_stage_model."):
        return "VAE"
    if not key.startswith("model.diffusion_model.") or ".time_embed" in key or ".label_emb" in key:
        return "BASE"
    if key.startswith("model.diffusion_model.out."):
        return "OUT08"
    for pattern, name in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
        m = re.search(pattern, key)
        if m:
            return f"{name}{int(m.group(1)):02d}"
    return "M00"


def test_sdxl_merges_block_wise_without_the_sd1_plugin(tmp_path):
    import torch
    from safetensors.torch import load_file

    import mecha_sdxl.plugin
    from mecha_core.kit import synthetic

    arch = host_with(mecha_sdxl.plugin).architecture("sdxl-sgm")
    # the small (1-D) keys of every part: text encoders, U-Net blocks, VAE; a few MB in all
    keys = [k for k, s in arch.keys.items() if not s.optional and len(s.shape) == 1]
    table = synthetic.key_table(arch, keys, "float32")
    a = synthetic.write_layout(tmp_path / "a.safetensors", table, seed=1)
    b = synthetic.write_layout(tmp_path / "b.safetensors", table, seed=2)
    alpha = {"default": 0.5, "BASE": 0.0, "IN04": 0.1, "M00": 0.3, "OUT08": 0.9, "VAE": 1.0}
    statuses = _merge_without_sd1(tmp_path, "sdxl,methods", a, b, "sdxl-sgm", alpha)
    assert statuses["sdxl"] == "ok" and statuses["methods"] == "ok" and statuses["sd1"] == "disabled"
    ta, tb, out = load_file(a), load_file(b), load_file(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(keys)
    seen = set()
    for key in keys:
        block = _sdxl_block(key)
        seen.add(block)
        w = alpha.get(block, alpha["default"])
        torch.testing.assert_close(out[key], ta[key] * (1 - w) + tb[key] * w, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert {"BASE", "IN04", "M00", "OUT08", "VAE", "IN01"} <= seen  # every kind of value was used


def test_sd3_merges_block_wise_without_the_sd1_plugin(tmp_path):
    import torch
    from safetensors.torch import load_file

    import mecha_sd3.plugin
    from mecha_core.kit import synthetic

    arch = host_with(mecha_sd3.plugin).architecture("sd3-comfyui")
    keys = [k for k, s in arch.keys.items() if s.component == "diffuser" and len(s.shape) == 1]
    table = synthetic.key_table(arch, keys, "float32")
    a = synthetic.write_layout(tmp_path / "a.safetensors", table, seed=3)
    b = synthetic.write_layout(tmp_path / "b.safetensors", table, seed=4)
    alpha = {"default": 0.5, "J00": 0.2, "J23": 0.8, "OUT": 1.0}
    statuses = _merge_without_sd1(tmp_path, "sd3,methods", a, b, "sd3-comfyui", alpha)
    assert statuses["sd3"] == "ok" and statuses["sd1"] == "disabled"
    ta, tb, out = load_file(a), load_file(b), load_file(tmp_path / "out.safetensors")
    for key in keys:
        rest = key.removeprefix("model.diffusion_model.")
        block = ("OUT" if rest.startswith("final_layer.") else
                 f"J{int(rest.split('.')[1]):02d}" if rest.startswith("joint_blocks.") else "IN")
        w = alpha.get(block, alpha["default"])
        torch.testing.assert_close(out[key], ta[key] * (1 - w) + tb[key] * w, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
