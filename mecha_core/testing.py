"""Helpers for tests of mecha and of third-party plugins.

- :func:`host_with` builds a plugin host from chosen plugin modules (no entry-point discovery),
  and :func:`using` makes it the process-wide host for a ``with`` block::

      from mecha_core.testing import using, check_plugin
      import my_plugin.plugin

      def test_contract():
          assert check_plugin(my_plugin.plugin) == []

      def test_merge(tmp_path):
          with using(my_plugin.plugin):
              ...  # mecha_core.<method> and mecha_core.merge see exactly this plugin

- :func:`write_checkpoint` writes a small safetensors file.
- :func:`check_plugin` runs the contract checks every plugin should pass.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
from typing import Any, Iterator, Mapping

import torch

from .engine.safetensors_io import save
from .method import MergeMethod
from .plugins import PluginHost, PluginRecord, use_host
from .specs import DELTA, MERGE_SPACES, WEIGHT, Architecture, Converter, ModelType

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _record_for(plugin: Any, index: int, name: str | None) -> PluginRecord:
    """The record a plugin would get if discovered: the entry-point name, distribution and version
    when an installed ``mecha`` entry point names this module; else a name from the module."""
    module = getattr(plugin, "__name__", None)
    if module:
        from importlib_metadata import entry_points

        for ep in entry_points(group="mecha"):
            if ep.value == module:
                dist = getattr(ep, "dist", None)
                return PluginRecord(name or ep.name, dist.name if dist else None,
                                    dist.version if dist else None, module=module)
    if name is None:
        parts = (module or f"plugin{index}").split(".")
        # ``my_pkg.plugin`` is named after its package, a lone module after itself
        name = parts[-2] if len(parts) > 1 and parts[-1] == "plugin" else parts[-1]
    return PluginRecord(name, None, None, module=module)


def host_with(*plugins: Any, names: list[str] | None = None, strict: bool = True) -> PluginHost:
    """A host holding exactly ``plugins`` (modules or objects with hook implementations).

    Nothing is discovered through entry points, and environment variables do not filter the list.
    ``names`` overrides the plugin names; ``strict`` (default on) raises on any plugin problem.
    """
    if names is not None and len(names) != len(plugins):
        raise ValueError(f"host_with: {len(plugins)} plugins but {len(names)} names")
    entries = []
    for i, plugin in enumerate(plugins):
        record = _record_for(plugin, i, names[i] if names else None)
        entries.append((record.name, plugin, record))
    return PluginHost(entries, autoload=False, strict=strict)


@contextlib.contextmanager
def using(*plugins: Any) -> Iterator[PluginHost]:
    """``with using(mecha_methods.plugin): ...`` — a host of chosen plugins, made current.

    A single :class:`PluginHost` argument is used as it is.
    """
    host = plugins[0] if len(plugins) == 1 and isinstance(plugins[0], PluginHost) else host_with(*plugins)
    with use_host(host):
        yield host


def write_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file; returns the path."""
    save(tensors, path, metadata)
    return os.fspath(path)


# -- contract checks ----------------------------------------------------------------------------
def _public_api_names() -> set[str]:
    import mecha_core

    return set(mecha_core.__all__)


def _method_problems(method: MergeMethod) -> list[str]:
    where = f"merge method '{method.name}'"
    out: list[str] = []
    if not _NAME.fullmatch(method.name) or keyword.iskeyword(method.name):
        out.append(f"{where}: the name must be a Python identifier (recipes and mecha_core.<name> use it)")
    elif method.name in _public_api_names():
        out.append(f"{where}: the name hides mecha_core.{method.name}; choose another")
    if not method.doc.strip():
        out.append(f"{where} has no docstring")
    for h in method.hyperparameters:
        default = h.default
        if not isinstance(default, (bool, int, float, str, type(None))):
            out.append(f"{where}: hyperparameter '{h.name}' defaults to {default!r}; "
                       f"a default must be a number, string, bool or None")
        elif h.kind is not None and default is not None:
            fits = (isinstance(default, h.kind) and not (h.kind is not bool and isinstance(default, bool))) or (
                h.kind is float and isinstance(default, int) and not isinstance(default, bool))
            if not fits:
                out.append(f"{where}: hyperparameter '{h.name}' is annotated {h.kind.__name__} "
                           f"but defaults to {default!r}")
        if not re.search(rf"\b{re.escape(h.name)}\b", method.doc):
            out.append(f"{where}: the docstring does not mention hyperparameter '{h.name}'")
    for space in [i.space for i in method.inputs] + [method.returns]:
        if space is not None and space not in MERGE_SPACES:
            out.append(f"{where}: unknown merge space {space!r}")
    return out


def _architecture_problems(arch: Architecture) -> list[str]:
    where = f"architecture '{arch.name}'"
    out: list[str] = []
    if not arch.keys:
        out.append(f"{where} has no keys")
    for what, names in (("blocks", arch.blocks), ("classes", arch.classes)):
        if len(set(names)) != len(names):
            out.append(f"{where}: {what} are listed more than once")
        bad = [n for n in names if not _NAME.fullmatch(n)]
        if bad:
            out.append(f"{where}: {what} {bad[:3]} are not names a recipe can write (letters, digits, _)")
    if not 0 < arch.min_match <= 1:
        out.append(f"{where}: min_match must be in (0, 1], got {arch.min_match}")
    blocks, classes = set(arch.blocks), set(arch.classes)
    for key, spec in arch.keys.items():
        unknown = [b for b in spec.blocks if b not in blocks]
        if unknown:
            out.append(f"{where}: key '{key}' is in blocks {unknown} that the architecture does not list")
            break
        if spec.klass is not None and spec.klass not in classes:
            out.append(f"{where}: key '{key}' has class '{spec.klass}' that the architecture does not list")
            break
        if not all(isinstance(d, int) and d >= 0 for d in spec.shape):
            out.append(f"{where}: key '{key}' has shape {spec.shape!r}; use a tuple of sizes")
            break
        if not isinstance(getattr(torch, spec.dtype, None), torch.dtype):
            out.append(f"{where}: key '{key}' has dtype {spec.dtype!r}, not a torch dtype name")
            break
    aliased = [a for spec in arch.keys.values() for a in spec.aliases if a in arch.keys]
    if aliased:
        out.append(f"{where}: alias '{aliased[0]}' is also a key of the architecture")
    return out


def _model_type_problems(model_type: ModelType) -> list[str]:
    where = f"model type '{model_type.name}'"
    out: list[str] = []
    if model_type.space not in (WEIGHT, DELTA):
        out.append(f"{where}: space must be '{WEIGHT}' or '{DELTA}', got {model_type.space!r}")
    try:
        empty = model_type.detect(frozenset())
    except Exception as exc:  # a detector runs on every file opened: it must never raise
        out.append(f"{where}: detect(frozenset()) raised {type(exc).__name__}: {exc}")
    else:
        if empty is not False:
            out.append(f"{where}: detect(frozenset()) must be False (an empty file is of no type), "
                       f"got {empty!r}")
    return out


def _converter_problems(converter: Converter) -> list[str]:
    where = f"converter '{converter.name}'"
    if (converter.source_arch, converter.source_type) == (converter.target_arch, converter.target_type):
        return [f"{where} converts ({converter.source_arch}, {converter.source_type}) to itself"]
    if not callable(converter.plan):
        return [f"{where}: plan is not callable"]
    return []


def check_plugin(plugin: Any) -> list[str]:
    """Contract problems of a plugin module, as one-line messages (empty when it is fine).

    The plugin is loaded alone. Checked: it imports and declares a supported
    ``MECHA_PLUGIN_API``; every hook returns a list of the right spec type; it provides no name
    twice; each merge method has a docstring that mentions every hyperparameter, a name recipes
    can use, and defaults that are recipe values of the annotated type; each architecture's keys
    name only its own blocks and classes and real dtypes; each model type lives in weight or delta
    space and never detects an empty file; no converter maps a pair to itself.
    """
    host = host_with(plugin, strict=False)
    problems = host.problems()
    record = host.records[0]
    if record.status != "ok":
        return problems
    for name in record.provides.get("merge_methods", []):
        if name in host.merge_methods.duplicates():
            continue
        problems += _method_problems(host.merge_methods.get(name))
    for name in record.provides.get("architectures", []):
        if name not in host.architectures.duplicates():
            problems += _architecture_problems(host.architectures.get(name))
    for name in record.provides.get("model_types", []):
        if name not in host.model_types.duplicates():
            problems += _model_type_problems(host.model_types.get(name))
    for name in record.provides.get("converters", []):
        if name not in host.converters.duplicates():
            problems += _converter_problems(host.converters.get(name))
    return problems
