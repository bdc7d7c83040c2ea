"""Architecture families: layouts computed from a file's header and config.json.

A fixed architecture lists its keys; a family (``llama``, ``mixtral`` ...) computes the concrete
architecture of one file (its layer count, widths, tied embeddings, experts) from the header and
the model's ``config.json``. Fixed architectures are tried first; a file none of them claims is
offered to every family. The concrete architecture is registered in the plugin host under its own
name (``llama-32l``), so the rest of a plan finds its blocks and classes like any other; a map
that names the family (``blocks("llama", ...)``) is resolved to the concrete layout of the call's
inputs when the merge is planned (:func:`concrete_map`).

A family whose ``detect`` raises counts as "not a member" (one warning per family on stderr), as
a model type's detector does; one that returns something that is not a valid architecture is a
one-line :class:`PluginCodeError`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ..errors import PlanError, PluginCodeError, RecipeError
from ..plugins import PLUGIN_FAILURES, PluginHost, describe_exception
from ..recipe.values import WeightMap
from ..specs import Architecture, ArchitectureFamily, TensorInfo
from ..validate import architecture_errors

CONFIG_NAME = "config.json"


def config_path(path: str) -> str:
    """Where a model's ``config.json`` is: in the model's folder (a folder model is its own)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, CONFIG_NAME)


def read_config(path: str) -> dict | None:
    """The ``config.json`` beside a model as a dict; ``None`` when there is none."""
    where = config_path(path)
    try:
        with open(where, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        text = " ".join(str(exc).splitlines())
        raise PlanError(f"{where}: cannot read the model's config ({type(exc).__name__}: {text})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{where}: the model's config must be a JSON object, got {type(config).__name__}")
    return config


def _member(family: ArchitectureFamily, path: str, header: Mapping[str, TensorInfo], config: dict | None,
            host: PluginHost) -> Architecture | None:
    plugin = host.architecture_families.provider(family.name)
    try:
        arch = family.detect(header, config)
    except PLUGIN_FAILURES as exc:
        host.warn_once(f"plugin '{plugin}': architecture family '{family.name}': detect raised "
                       f"{describe_exception(exc)} while reading {os.path.basename(path)}; treating "
                       f"files as not of this family", exc, key=f"family {plugin} {family.name}")
        return None
    if arch is None:
        return None
    if not isinstance(arch, Architecture):
        raise PluginCodeError(f"plugin '{plugin}': architecture family '{family.name}' returned "
                              f"{type(arch).__name__} for {os.path.basename(path)}; detect must return "
                              f"an Architecture or None", plugin=plugin)
    problems = architecture_errors(arch)
    if problems:
        raise PluginCodeError(f"plugin '{plugin}': architecture family '{family.name}' computed an "
                              f"invalid layout for {os.path.basename(path)}: {problems[0]}", plugin=plugin)
    return arch


def detect_family(path: str, header: Mapping[str, TensorInfo], host: PluginHost,
                  config: dict | None = None) -> Architecture | None:
    """The concrete architecture the one family claiming the file computes (registered in
    ``host``); ``None`` when no family claims it. ``config`` defaults to the file's config.json."""
    families = list(host.architecture_families.values())
    if not families:
        return None
    if config is None:
        config = read_config(path)
    found = [(f.name, arch) for f in families
             if (arch := _member(f, path, header, config, host)) is not None]
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise PlanError(f"{path}: the architecture is ambiguous (candidates: {names}); "
                        f"name one with model(..., arch=...)")
    if not found:
        return None
    family, arch = found[0]
    return host.add_family_member(family, arch)


def family_architecture(name: str, path: str, header: Mapping[str, TensorInfo],
                        host: PluginHost) -> Architecture | None:
    """The concrete architecture of a file that a recipe says is of family ``name``
    (``model(..., arch="llama")``); ``None`` when ``name`` is no family."""
    family = host.architecture_families.get(name)
    if family is None:
        return None
    arch = _member(family, path, header, read_config(path), host)
    if arch is None:
        raise PlanError(f"{path}: model(..., arch=\"{name}\") names the {name} family, but the file "
                        f"is not one of its members (`mecha inspect` shows what it is)")
    return host.add_family_member(name, arch)


def concrete_map(value: WeightMap, archs: Mapping[str, str], host: PluginHost, what: str) -> WeightMap:
    """A map naming a family (``blocks("llama", ...)``) made to name the concrete layout of the
    call's inputs (``archs``: architecture name -> a file of it); other maps are returned as is."""
    name = value.arch
    if name in host.architectures or host.family_of(name) is not None or name not in host.architecture_families:
        return value
    members = [a for a in archs if host.family_of(a) == name]
    if not members:
        found = ", ".join(sorted(archs)) or "no known architecture"
        raise RecipeError(f"{what}: the map names the {name} family, but the models of this merge are "
                          f"not {name} models (they are: {found})")
    concrete = members[0]
    return value.with_archs(lambda _: concrete)


def describe_member(arch: Architecture, host: PluginHost) -> dict[str, Any]:
    """What a family member is, for ``mecha inspect``: its family and its description."""
    return {"family": host.family_of(arch.name), "description": arch.description}
