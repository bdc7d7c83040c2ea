"""Model inputs as the engine sees them: a key table plus a way to read each key.

A file is opened lazily (header only), its architecture and model type detected from key names,
and converters applied until its values are plain weights or deltas in a canonical layout.

Detectors and converters are plugin code: a detector that raises counts as "not this type" (with
one warning per detector on stderr), so a broken plugin never stops files it does not read; a
converter that raises anything but ``ValueError`` ("does not apply") is a one-line
:class:`PluginCodeError` naming the plugin, the converter and the file.
"""

from __future__ import annotations

import errno
import inspect
import os
from typing import Any, Mapping

import attrs

from ..lazy import torch

from ..builtin_plugins import install_hint
from ..errors import MechaError, PlanError, PluginCodeError, RecipeError
from ..plugins import PLUGIN_FAILURES, PluginHost, describe_exception, plugin_code
from ..recipe.nodes import ModelNode
from ..specs import Architecture, ConvertedKey, Converter, FileFormat, TensorInfo
from . import folders
from .families import detect_family, family_architecture
from .folders import is_model_folder
from .quantized import DequantisedFile, dequantising
from .safetensors_io import SafetensorsFile

BASE_TYPES = ("base", "delta")


class Source:
    """One model input: its keys, where it came from, and how to read a key."""

    path: str
    arch: str | None
    type: str
    space: str
    keys: Mapping[str, TensorInfo]
    direct: bool  # keys are stored tensors (they can be read in slices)
    metadata: Mapping[str, str] = {}  # the file's __metadata__ (training settings, recipes)
    refusals: tuple[str, ...] = ()  # converters that refused the file before one applied (ValueError)

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Start reading a key in the background (a hint; the default does nothing)."""

    def close(self) -> None:
        pass


class FileSource(Source):
    """A safetensors file read as is (keys renamed from architecture aliases)."""

    direct = True

    def __init__(self, path: str, file: SafetensorsFile | DequantisedFile | FormatFile, arch: str | None, type_: str,
                 space: str, renames: Mapping[str, str]):
        self.path, self.file, self.arch, self.type, self.space = path, file, arch, type_, space
        self.direct = getattr(file, "direct", True)  # a dequantised fp8 weight is computed whole
        self.metadata = file.metadata
        self._stored = {renames.get(k, k): k for k in file.keys}
        self.keys = {renames.get(k, k): info for k, info in file.keys.items()}

    def read(self, key: str) -> torch.Tensor:
        return self.file.read(self._stored[key])

    def stored(self, key: str) -> tuple[SafetensorsFile, str]:
        """The file holding ``key`` and its name there (to copy its bytes as they are)."""
        return self.file, self._stored[key]

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self.file.prefetch(self._stored[key], start, stop)

    def close(self) -> None:
        self.file.close()


class ConvertedSource(Source):
    """Another source seen through a converter (a LoRA as a delta, diffusers keys as ldm keys)."""

    direct = False

    def __init__(self, inner: Source, converter: Converter, plan: Mapping[str, ConvertedKey], arch: str | None,
                 space: str, plugin: str | None = None):
        self.inner, self.converter, self.plan, self.plugin = inner, converter, plan, plugin
        self.path, self.arch, self.type, self.space = inner.path, arch, converter.target_type, space
        self.metadata = inner.metadata
        self.keys = {k: ck.info for k, ck in plan.items()}

    def read(self, key: str) -> torch.Tensor:
        ck = self.plan[key]
        inputs = {s: self.inner.read(s) for s in ck.sources}  # a damaged file is not the plugin's fault
        return plugin_code(lambda: ck.compute(inputs), plugin=self.plugin,
                           what=f"converter '{self.converter.name}'",
                           where=f" computing key '{key}' of {os.path.basename(self.path)}")

    def close(self) -> None:
        self.inner.close()


def _link_loop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def resolve_path(node: ModelNode, models_dir: str | None) -> str:
    """Find the file a model node names: absolute, or under the models dir, the recipe's folder, cwd."""
    raw = os.path.expanduser(node.path)
    candidates = [raw] if os.path.isabs(raw) else [
        os.path.join(d, raw) for d in (models_dir, node.base_dir, os.getcwd()) if d]
    tried = []
    for cand in candidates:
        # a bare name may hold dots ("ghostmix_v2.0"): try it with the extension too
        for path in (cand,) if cand.endswith(".safetensors") else (cand, cand + ".safetensors"):
            tried.append(path)
            if os.path.exists(path) and not os.path.isdir(path):  # "sd15" may be a diffusers folder
                return path
            if os.path.islink(path) and _link_loop(path):  # not "not found": the file is there, broken
                raise PlanError(f"model '{node.path}': {path}: symbolic link loop")
    folder = next((t for t in tried if os.path.isdir(t)), None)
    if folder is not None and is_model_folder(folder):  # a Hugging Face or diffusers folder
        return os.path.abspath(folder)
    if folder is not None:
        raise PlanError(f"model '{node.path}': {folder} is a directory, not a safetensors file (nor a model "
                        f"folder: no model.safetensors, model.safetensors.index.json, model_index.json or "
                        f"adapter_model.safetensors)")
    where = ", ".join(dict.fromkeys(os.path.dirname(t) or "." for t in tried))
    raise PlanError(f"model file '{node.path}' not found (looked in {where}); pass --models-dir")


def _alias_map(arch: Architecture) -> dict[str, str]:
    return {alias: key for key, spec in arch.keys.items() for alias in spec.aliases}


def detect_architecture(path: str, keys: frozenset[str], host: PluginHost) -> Architecture | None:
    """The architecture whose required keys a file holds; ``None`` when none fits. Lazy tables
    the file cannot match are never built (:meth:`~mecha_core.plugins.ArchitectureRegistry.detection_candidates`)."""
    scored = []
    for arch in host.architectures.detection_candidates(keys):
        required = arch.required_keys
        if not required:
            continue
        aliases = _alias_map(arch)
        present = {aliases.get(k, k) for k in keys}
        score = len(required & present) / len(required)
        if score >= arch.min_match:
            unexpected = len(present - set(arch.keys))
            scored.append((score, -unexpected, arch))
    if not scored:
        return None
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    if len(scored) > 1 and scored[0][:2] == scored[1][:2]:
        names = ", ".join(s[2].name for s in scored if s[:2] == scored[0][:2])
        raise PlanError(f"{path}: the architecture is ambiguous (candidates: {names}); "
                        f"name one with model(..., arch=...)")
    return scored[0][2]


def _detects(mt: Any, path: str, keys: frozenset[str], host: PluginHost) -> bool:
    """Whether model type ``mt`` claims the file. A detector that raises does not: the file is
    treated as not of that type, and a warning (once per detector) names the plugin, so one
    broken plugin cannot stop merges and inspections of files it has nothing to do with."""
    try:
        return bool(mt.detect(keys))
    except PLUGIN_FAILURES as exc:
        plugin = host.model_types.provider(mt.name)
        host.warn_once(f"plugin '{plugin}': model type '{mt.name}': detect raised {describe_exception(exc)} "
                       f"while reading {os.path.basename(path)}; "
                       f"treating files as not of this type", exc, key=f"detect {plugin} {mt.name}")
        return False


def detect_type(path: str, keys: frozenset[str], host: PluginHost) -> str:
    found = [mt.name for mt in host.model_types.values() if _detects(mt, path, keys, host)]
    if len(found) > 1:
        raise PlanError(f"{path}: the model type is ambiguous (candidates: {', '.join(found)}); "
                        f"name one with model(..., type=...)")
    return found[0] if found else "base"


def _keywords(plan: Any) -> set[str]:
    try:
        return set(inspect.signature(plan).parameters)
    except (TypeError, ValueError):
        return set()


def _apply(source: Source, conv: Converter, host: PluginHost, refusals: list[str] | None = None,
           allow_missing: bool = False) -> Source | None:
    wanted = _keywords(conv.plan)
    extra: dict[str, Any] = {}
    if "metadata" in wanted:  # e.g. a PEFT LoRA's lora_alpha lives in the metadata
        extra["metadata"] = dict(source.metadata)
    if "path" in wanted:  # e.g. a PEFT adapter's adapter_config.json lies beside its weights
        extra["path"] = source.path
    if "allow_missing" in wanted:  # e.g. a LoRA's modules that match no layer: skipped, not an error
        extra["allow_missing"] = allow_missing
    plugin = host.converters.provider(conv.name)
    try:
        plan = conv.plan(source.keys, **extra)
    except ValueError as exc:  # the documented "this converter does not apply to this file"
        if refusals is not None:
            refusals.append(f"converter '{conv.name}' of plugin '{plugin}' does not apply: "
                            f"{' '.join(str(exc).splitlines()) or 'ValueError'}")
        return None
    except MechaError:
        raise
    except PLUGIN_FAILURES as exc:
        raise PluginCodeError(f"plugin '{plugin}': converter '{conv.name}' raised {describe_exception(exc)} "
                              f"while reading {os.path.basename(source.path)}",
                              plugin=plugin) from exc
    if not isinstance(plan, Mapping) or not all(isinstance(ck, ConvertedKey) for ck in plan.values()):
        raise PluginCodeError(f"plugin '{plugin}': converter '{conv.name}' returned {type(plan).__name__} "
                              f"while reading {os.path.basename(source.path)}; plan must return "
                              f"{{key: ConvertedKey}}", plugin=plugin)
    target_arch = conv.target_arch or source.arch
    space = host.model_types.get(conv.target_type).space if conv.target_type in host.model_types else source.space
    return ConvertedSource(source, conv, plan, target_arch, space, plugin)


class FormatFile:
    """A file of a plugin's format (:class:`~mecha_core.specs.FileFormat`) with the reader's
    interface; its keys are read whole, through the plugin's code."""

    direct = False

    def __init__(self, path: str, opened: Any, fmt: FileFormat, plugin: str | None):
        self.path, self.opened, self.fmt, self.plugin = path, opened, fmt, plugin
        self.keys: Mapping[str, TensorInfo] = dict(opened.keys)
        self.metadata: Mapping[str, str] = dict(getattr(opened, "metadata", None) or {})

    def read(self, key: str) -> torch.Tensor:
        return plugin_code(lambda: self.opened.read(key), plugin=self.plugin,
                           what=f"file format '{self.fmt.name}'",
                           where=f" reading key '{key}' of {os.path.basename(self.path)}")

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.opened.close()


def open_weights(path: str, host: PluginHost) -> SafetensorsFile | DequantisedFile | FormatFile | folders.FolderFile:
    """The weights file at ``path``: a plugin's format when its name ends in one of the format's
    suffixes, a folder or an index as its shards (:mod:`.folders`), else safetensors (scaled fp8
    weights dequantised, see :mod:`.quantized`)."""
    if os.path.isdir(path) or folders.is_index_path(path):
        folder = folders.open_folder(path)
        try:  # a weight and its scale may sit in different shards: the folder reads both by key
            return dequantising(folder)
        except BaseException:
            folder.close()
            raise
    lower = path.lower()
    for fmt in host.file_formats.values():
        if lower.endswith(tuple(fmt.suffixes)):
            plugin = host.file_formats.provider(fmt.name)
            try:
                opened = plugin_code(lambda f=fmt: f.open(path), plugin=plugin, what=f"file format '{fmt.name}'",
                                     where=f" opening {os.path.basename(path)}")
            except PluginCodeError as exc:
                if isinstance(exc.__cause__, ValueError):  # the documented "cannot read this file"
                    raise PlanError(f"{path}: {' '.join(str(exc.__cause__).splitlines())}") from None
                raise
            return FormatFile(path, opened, fmt, plugin)
    file = SafetensorsFile(path)
    try:
        return dequantising(file)  # scaled fp8 weights read as real weights; their scales leave the table
    except BaseException:
        file.close()
        raise


def open_source(node: ModelNode, path: str, host: PluginHost, allow_missing: bool = False) -> Source:
    """Open a model file (or folder) and convert it to weights or a delta in its canonical layout."""
    file: SafetensorsFile | Any = open_weights(path, host)
    path = file.path  # a folder model's path is its folder, also when an index file was named
    try:
        keys = frozenset(file.keys)
        type_ = node.type or detect_type(path, keys, host)
        if type_ not in host.model_types:
            raise RecipeError(f"{path}: unknown model type '{type_}'{install_hint('model type', type_)}")
        arch: Architecture | None = None
        if node.arch is not None:
            arch = family_architecture(node.arch, path, file.keys, host) or host.architecture(node.arch)
            node = attrs.evolve(node, arch=arch.name)  # a family's name stands for this file's layout
        elif type_ in BASE_TYPES:
            # fixed layouts first; a file none of them claims may be a family's member
            arch = detect_architecture(path, keys, host) or detect_family(path, file.keys, host)
        renames = _alias_map(arch) if arch is not None and type_ in BASE_TYPES else {}
        renames = {k: v for k, v in renames.items() if k in keys and v not in keys}
        space = host.model_types.get(type_).space
        source: Source = FileSource(path, file, arch.name if arch else None, type_, space, renames)
        return _convert(source, node, host, allow_missing)
    except BaseException:
        file.close()
        raise


def _convert(source: Source, node: ModelNode, host: PluginHost, allow_missing: bool = False) -> Source:
    wanted_arch = host.architecture(node.arch).name if node.arch else None
    for _ in range(8):  # converters form short paths; a longer one is a loop between plugins
        if source.type in BASE_TYPES:
            # canonical layout: follow arch-changing converters that keep the type
            step = next((c for c in host.converters.values()
                         if c.source_arch == source.arch and source.arch is not None
                         and c.source_type == source.type and c.target_type == source.type
                         and c.target_arch not in (None, source.arch)), None)
            converted = _apply(source, step, host, allow_missing=allow_missing) if step is not None else None
            if converted is None:
                return source
            source = converted
            continue
        candidates = [c for c in host.converters.values()
                      if c.source_type == source.type and c.source_arch in (None, source.arch, wanted_arch)
                      and (wanted_arch is None or c.target_arch in (None, wanted_arch))]
        converted = None
        refusals: list[str] = []
        for conv in candidates:
            converted = _apply(source, conv, host, refusals, allow_missing)
            if converted is not None:
                break
        if converted is None:
            why = f" ({refusals[0]})" if refusals else "; is the plugin that reads it installed? (`mecha plugins list`)"
            raise PlanError(f"{source.path}: no converter turns a '{source.type}' model into weights "
                            f"or a delta{' for ' + wanted_arch if wanted_arch else ''}{why}")
        converted.refusals = source.refusals + tuple(refusals)
        source = converted
    raise PlanError(f"{source.path}: converters loop; check `mecha plugins check`")
