"""The plugin host: finds plugins through the ``mecha`` entry-point group and isolates them.

Discovery happens once per process, on first use (never at import). Each plugin is imported and
each of its hooks called on its own: a failure marks that plugin ``error`` and the others work.
Environment variables:

- ``MECHA_LOAD_PLUGINS``: comma-separated allow list of plugin names (the entry-point names);
  the others are listed with status ``disabled``.
- ``MECHA_DISABLE_PLUGINS``: comma-separated block list (status ``disabled``).
- ``MECHA_STRICT_PLUGINS=1``: raise :class:`PluginError` on the first plugin problem (a failed
  import, a raising hook, an invalid spec, two plugins claiming one name) instead of recording it
  and going on.

Every spec a plugin returns is checked against the contract in :mod:`mecha_core.validate`; one
that breaks it marks the plugin ``error`` (naming the spec and field) and none of its specs is
registered. Plugin code that raises later (a detector, a converter, a merge method) becomes a
one-line :class:`~mecha_core.errors.PluginCodeError` naming the plugin: see :func:`plugin_code`.

A plugin module may declare ``MECHA_PLUGIN_API = <int>``; it must not be newer than
:data:`PLUGIN_API_VERSION`. A plugin that declares nothing is accepted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from typing import Any, Callable, Collection, Iterator, TypeVar

import attrs
import pluggy

from . import hookspecs
from .builtin_plugins import install_hint
from .collector import no_gc
from .errors import MechaError, PluginCodeError, PluginError, RecipeError
from .method import MergeMethod
from .operators import CORE_METHODS
from .specs import (DELTA, WEIGHT, Architecture, ArchitectureFamily, CliCommand, Converter, Executor, FileFormat,
                    LazyArchitecture, ModelType, RecipeFormat)
from .validate import lazy_table_errors, spec_errors

#: The plugin API this core implements. Plugins built for a newer API are refused.
PLUGIN_API_VERSION = 1
MIN_PLUGIN_API_VERSION = 1

hookimpl = pluggy.HookimplMarker("mecha")

#: The model types every merge knows without plugins: a plain checkpoint, and a stored difference.
CORE_MODEL_TYPES = (
    ModelType("base", WEIGHT, detect=lambda keys: False, description="a plain checkpoint (weights)"),
    ModelType("delta", DELTA, detect=lambda keys: False, description="a stored difference of two checkpoints"),
)

_HOOKS = {
    "mecha_architectures": ("architectures", Architecture),
    "mecha_architecture_families": ("architecture_families", ArchitectureFamily),
    "mecha_model_types": ("model_types", ModelType),
    "mecha_converters": ("converters", Converter),
    "mecha_merge_methods": ("merge_methods", MergeMethod),
    "mecha_cli_commands": ("cli_commands", CliCommand),
    "mecha_file_formats": ("file_formats", FileFormat),
    "mecha_recipe_formats": ("recipe_formats", RecipeFormat),
    "mecha_executors": ("executors", Executor),
}
#: Hooks that may also return another spec type than the one their errors name.
_ALSO_ACCEPTED: dict[str, tuple[type, ...]] = {"mecha_architectures": (LazyArchitecture,)}

#: What plugin code may raise that the host turns into a one-line error: everything but
#: KeyboardInterrupt (and GeneratorExit), including ``sys.exit()`` called by a plugin.
PLUGIN_FAILURES = (Exception, SystemExit)

_T = TypeVar("_T")


@attrs.define
class PluginRecord:
    """One plugin as the host sees it."""

    name: str
    """The entry-point name (``methods``, ``sd1`` ...)."""
    distribution: str | None
    """The installed distribution that provides it, when known."""
    version: str | None
    """That distribution's version."""
    module: str | None = None
    """The module holding its hook implementations (the entry point's value)."""
    status: str = "ok"
    """``ok``, ``error`` or ``disabled``."""
    error: str | None = None
    """Why it failed, for status ``error``."""
    provides: dict[str, list[str]] = attrs.field(factory=dict)
    """Names it provides, by kind (``merge_methods``, ``architectures`` ...)."""
    specs: list[Any] = attrs.field(factory=list, repr=False)
    """Every spec its hooks returned, also when they failed validation (``plugins check`` lists
    each problem; the ``error`` field holds the first). Not part of :meth:`as_dict`."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, _: a.name != "specs")


class Registry:
    """Name -> spec, remembering every provider so duplicates can be reported when used."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, list[tuple[str, Any]]] = {}

    def add(self, plugin: str, name: str, item: Any) -> None:
        self._items.setdefault(name, []).append((plugin, item))

    def get(self, name: str) -> Any:
        providers = self._items.get(name)
        if not providers:
            return None
        if len(providers) > 1:
            names = " and ".join(f"plugin '{p}'" for p, _ in providers)
            raise PluginError(f"{self.kind} '{name}' is provided by both {names}; "
                              f"disable one with MECHA_DISABLE_PLUGINS")
        return providers[0][1]

    def provider(self, name: str) -> str | None:
        providers = self._items.get(name)
        return providers[0][0] if providers else None

    def names(self) -> list[str]:
        return sorted(self._items)

    def duplicates(self) -> dict[str, list[str]]:
        return {n: [p for p, _ in ps] for n, ps in self._items.items() if len(ps) > 1}

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def values(self) -> list[Any]:
        return [self.get(n) for n in self.names() if len(self._items[n]) == 1]


class ArchitectureRegistry(Registry):
    """The fixed architectures. A :class:`~mecha_core.specs.LazyArchitecture`'s table is built
    (and checked against what the lazy spec declared) the first time it is looked up; detection
    asks :meth:`detection_candidates`, which leaves out the tables a file cannot match."""

    def __init__(self) -> None:
        super().__init__("architecture")
        self._built: dict[str, Architecture] = {}

    def get(self, name: str) -> Any:
        found = super().get(name)
        return self._table(name, found) if isinstance(found, LazyArchitecture) else found

    def _table(self, name: str, lazy: LazyArchitecture) -> Architecture:
        built = self._built.get(name)
        if built is None:
            plugin = self.provider(name)
            with no_gc():  # the table lives as long as the process (see PluginHost.__init__)
                arch = plugin_code(lazy.build, plugin=plugin, what=f"architecture '{name}': build()")
            problems = lazy_table_errors(lazy, arch)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise PluginError(f"plugin '{plugin}': {problems[0]}{more}; `mecha plugins check` lists them")
            built = self._built[name] = arch
        return built

    def built(self) -> list[str]:
        """The names whose lazy tables have been built so far."""
        return sorted(self._built)

    def detection_candidates(self, keys: Collection[str]) -> list[Architecture]:
        """:meth:`values` less the lazy tables not built yet that a file with ``keys`` cannot
        match: fewer of its keys start with one of the lazy spec's ``key_prefixes`` than
        ``min_match`` of its required keys (each key counting towards a match is under a prefix,
        so its score is below ``min_match`` too; the comparison is the detector's own, a float
        division, so it is exact at the boundary). Tables without required keys, which detection
        skips, are left out alike."""
        out = []
        for name in self.names():
            providers = self._items[name]
            if len(providers) != 1:
                continue
            lazy = providers[0][1]
            if isinstance(lazy, LazyArchitecture) and name not in self._built:
                if not lazy.required_keys:
                    continue
                under = sum(1 for key in keys if key.startswith(lazy.key_prefixes))
                if under / lazy.required_keys < lazy.min_match:
                    continue
            out.append(self.get(name))
        return out


def _same_layout(known: tuple[str, Architecture], family: str, arch: Architecture) -> bool:
    owner, first = known
    return (owner == family and first.keys.keys() == arch.keys.keys() and first.blocks == arch.blocks
            and first.classes == arch.classes and first.layers == arch.layers)


def _name_and_version(dist: Any) -> tuple[str, str]:
    """A distribution's ``Name`` and ``Version``, read from the top of its metadata file.

    ``dist.name`` and ``dist.version`` parse the whole file with the ``email`` package (imported
    for it) on every start; the two fields are plain header lines at the top, which is all this
    reads. Anything unusual (no such file, a field missing) goes to the full parser."""
    found: dict[str, str] = {}
    try:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    except (OSError, UnicodeDecodeError, AttributeError):  # AttributeError: a Distribution without files
        text = ""
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the headers
        field, sep, value = line.partition(":")
        if sep and field in ("Name", "Version") and field not in found and not line[0].isspace():
            found[field] = value.strip()
    if len(found) == 2 and all(found.values()):
        return found["Name"], found["Version"]
    return dist.name, dist.version


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def describe_exception(exc: BaseException) -> str:
    """``TYPE: MESSAGE`` on one line, whatever the plugin put in its message."""
    text = " ".join(str(exc).splitlines())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__




def plugin_code(fn: Callable[[], _T], *, plugin: str | None, what: str, where: str = "") -> _T:
    """Run plugin code: a failure becomes a one-line :class:`PluginCodeError`
    ``plugin 'P': WHAT raised TYPE: MESSAGE WHERE`` (a :class:`MechaError` it raises on purpose
    passes through; KeyboardInterrupt always propagates)."""
    try:
        return fn()
    except MechaError:
        raise
    except PLUGIN_FAILURES as exc:
        raise PluginCodeError(f"plugin '{plugin or '?'}': {what} raised {describe_exception(exc)}{where}",
                              plugin=plugin) from exc


def _api_range() -> str:
    if MIN_PLUGIN_API_VERSION == PLUGIN_API_VERSION:
        return str(PLUGIN_API_VERSION)
    return f"{MIN_PLUGIN_API_VERSION} to {PLUGIN_API_VERSION}"


class PluginHost:
    """Loads plugins and holds the registries of what they provide."""

    def __init__(self, plugins: list[tuple[Any, ...]] | None = None, *, autoload: bool = True,
                 strict: bool | None = None):
        """Load plugins now.

        ``plugins``: extra ``(name, module)`` pairs (or ``(name, module, record)`` where the
        :class:`PluginRecord` carries a distribution and version); ``autoload``: also discover the
        ``mecha`` entry points; ``strict``: raise on any problem (default: ``MECHA_STRICT_PLUGINS``).
        """
        self.strict = os.environ.get("MECHA_STRICT_PLUGINS") == "1" if strict is None else strict
        self.records: list[PluginRecord] = []
        self.architectures = ArchitectureRegistry()
        self.architecture_families = Registry("architecture family")
        self._family_members: dict[str, tuple[str, Architecture]] = {}
        self.model_types = Registry("model type")
        self.converters = Registry("converter")
        self.merge_methods = Registry("merge method")
        self.cli_commands = Registry("cli command")
        self.file_formats = Registry("file format")
        self.recipe_formats = Registry("recipe format")
        self.executors = Registry("executor")
        self._arch_aliases: dict[str, str] = {}
        for mt in CORE_MODEL_TYPES:
            self.model_types.add("mecha-core", mt.name, mt)
        for method in CORE_METHODS:  # the operators -, +, * and | (mecha_core/operators.py)
            self.merge_methods.add("mecha-core", method.name, method)
        self.warnings: list[str] = []
        """Problems that belong to no plugin (an allow list naming a plugin that is not installed)."""
        self._warned: set[str] = set()
        # their modules and key tables live as long as the process: a full collection while
        # they load would walk every object torch allocated (bench/bench_startup.py)
        with no_gc():
            if autoload:
                self._discover()
            for entry in plugins or []:
                record = entry[2] if len(entry) > 2 else PluginRecord(entry[0], None, None)
                self._load(record, lambda m=entry[1]: m)
        if self.strict:
            duplicates = self._duplicate_problems()
            if duplicates:
                raise PluginError(duplicates[0])

    # -- loading --------------------------------------------------------------------------
    def _discover(self) -> None:
        from importlib_metadata import entry_points

        allow = _env_list("MECHA_LOAD_PLUGINS")
        block = _env_list("MECHA_DISABLE_PLUGINS") or set()
        found = sorted(entry_points(group="mecha"), key=lambda e: (e.name, e.value))
        for ep in found:
            dist = getattr(ep, "dist", None)
            name, version = _name_and_version(dist) if dist else (None, None)
            record = PluginRecord(ep.name, name, version, module=ep.value)
            if (allow is not None and ep.name not in allow) or ep.name in block:
                record.status = "disabled"
                self.records.append(record)
                continue
            self._load(record, ep.load)
        by_name: dict[str, list[str]] = {}
        for ep in found:
            dist = getattr(ep, "dist", None)
            by_name.setdefault(ep.name, []).append(_name_and_version(dist)[0] if dist else ep.value)
        for name, owners in sorted(by_name.items()):
            if len(owners) > 1:
                self.warnings.append(f"plugin name '{name}' is used by {' and '.join(owners)}; "
                                     f"uninstall one of them")
        for name in sorted((allow or set()) - {ep.name for ep in found}):
            self.warnings.append(f"MECHA_LOAD_PLUGINS names '{name}', which is not installed "
                                 f"(installed: {', '.join(sorted({ep.name for ep in found})) or 'none'})")

    def _fail(self, record: PluginRecord, message: str, exc: BaseException | None = None) -> None:
        record.status, record.error, record.provides = "error", message, {}
        if self.strict:
            raise PluginError(f"plugin '{record.name}' failed: {message}") from exc

    def _load(self, record: PluginRecord, load: Any) -> None:
        self.records.append(record)
        try:
            module = load()
        except PLUGIN_FAILURES as exc:  # a broken plugin (even one calling sys.exit()) must not break the others
            return self._fail(record, describe_exception(exc), exc)
        if record.module is None:
            record.module = getattr(module, "__name__", None)
        api = getattr(module, "MECHA_PLUGIN_API", None)
        supported = (isinstance(api, int) and not isinstance(api, bool)
                     and MIN_PLUGIN_API_VERSION <= api <= PLUGIN_API_VERSION)
        if api is not None and not supported:
            return self._fail(record, f"declares MECHA_PLUGIN_API = {api!r}, but this mecha-core "
                                      f"supports plugin API {_api_range()}; install a mecha-core "
                                      f"that supports it, or an older version of the plugin")
        pm = pluggy.PluginManager("mecha")
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(module, name=record.name)
            pm.check_pending()
        except PLUGIN_FAILURES as exc:
            return self._fail(record, describe_exception(exc), exc)
        collected: list[tuple[str, str, Any]] = []
        for hook_name, (kind, cls) in _HOOKS.items():
            accepted = (cls, *_ALSO_ACCEPTED.get(hook_name, ()))
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                try:
                    result = impl.function()
                except PLUGIN_FAILURES as exc:
                    return self._fail(record, f"{hook_name}() raised {describe_exception(exc)}", exc)
                if result is None:
                    continue
                if not isinstance(result, (list, tuple)):
                    return self._fail(record, f"{hook_name}() returned {type(result).__name__}; "
                                              f"it must return a list of {cls.__name__}")
                for item in result:
                    if not isinstance(item, accepted):
                        return self._fail(record, f"{hook_name}() returned {type(item).__name__}, "
                                                  f"expected {cls.__name__}")
                    collected.append((kind, item.name, item))
        record.specs = [item for _, _, item in collected]
        errors = [problem for _, _, item in collected for problem in spec_errors(item)]
        if errors:
            more = f" (and {len(errors) - 1} more; `mecha plugins check` lists them)" if len(errors) > 1 else ""
            return self._fail(record, errors[0] + more)
        for kind, name, item in collected:
            getattr(self, kind).add(record.name, name, item)
            record.provides.setdefault(kind, []).append(name)
            if kind == "architectures":
                for alias in item.aliases:
                    self._arch_aliases[alias] = item.name

    # -- lookups --------------------------------------------------------------------------
    def method(self, name: str) -> MergeMethod:
        found = self.merge_methods.get(name)
        if found is None:
            import difflib

            hint = difflib.get_close_matches(name, self.merge_methods.names(), n=1)
            suffix = f"; did you mean '{hint[0]}'?" if hint else "; `mecha methods` lists them"
            suffix = install_hint("merge method", name) or suffix
            raise RecipeError(f"unknown merge method '{name}'{suffix}{self.disabled_note()}")
        return found

    def executor(self, name: str) -> Executor:
        """The executor a plugin provides as ``name`` (the core's ``local`` is not in the
        registry: see :mod:`mecha_core.executors`); unknown: a one-line error with the
        distribution to install."""
        found = self.executors.get(name)
        if found is None:
            known = ", ".join(["local", *sorted(self.executors.names())])
            suffix = install_hint("executor", name) or f" (installed: {known})"
            raise MechaError(f"unknown executor '{name}'{suffix}{self.disabled_note()}")
        return found

    def disabled_note(self) -> str:
        """``; plugins disabled by ...: a, b`` when some are, for errors about something unknown
        (an empty MECHA_LOAD_PLUGINS disables them all, which is easy to do by accident)."""
        off = [r.name for r in self.records if r.status == "disabled"]
        if not off:
            return ""
        return f" (plugins disabled by MECHA_LOAD_PLUGINS/MECHA_DISABLE_PLUGINS: {', '.join(off)})"

    def architecture(self, name: str) -> Architecture:
        found = self.architectures.get(self._arch_aliases.get(name, name))
        if found is None and name in self._family_members:
            found = self._family_members[name][1]
        if found is None:
            import difflib

            hint = difflib.get_close_matches(name, self.architectures.names(), n=1)
            suffix = f"; did you mean '{hint[0]}'?" if hint else "; `mecha info` lists them"
            suffix = install_hint("architecture", name) or suffix
            raise RecipeError(f"unknown architecture '{name}'{suffix}")
        return found

    def add_family_member(self, family: str, arch: Architecture) -> Architecture:
        """Register the concrete architecture a family computed for a file, so the rest of a
        plan (block maps, optional keys, merge contexts) finds it by name; returns it as
        registered. The first file of a name registers it; a later one with the same key names,
        blocks and classes is the same layout (widths may differ: the plan reports those as shape
        mismatches). A layout the family gave a name already taken by another layout is
        registered as ``NAME~DIGEST`` (a digest of its key names), so it never borrows the other's
        blocks."""
        if arch.name in self.architectures:
            raise PluginError(f"architecture family '{family}' named a file's layout "
                              f"'{arch.name}', which is a fixed architecture's name")
        known = self._family_members.get(arch.name)
        if known is not None and not _same_layout(known, family, arch):
            import hashlib

            text = "\n".join([*sorted(arch.keys), "", *arch.blocks, "", *arch.classes, "", family])
            arch = attrs.evolve(arch, name=f"{arch.name}~{hashlib.sha1(text.encode()).hexdigest()[:8]}")
            known = self._family_members.get(arch.name)
        if known is None:
            self._family_members[arch.name] = (family, arch)
            return arch
        return known[1]

    def family_of(self, name: str) -> str | None:
        """The family whose member ``name`` is (a concrete architecture computed for a file)."""
        known = self._family_members.get(name)
        return known[0] if known else None

    def architecture_provider(self, name: str) -> str | None:
        """The plugin providing architecture ``name``: a fixed one's, or its family's."""
        family = self.family_of(name)
        if family is not None:
            return self.architecture_families.provider(family)
        return self.architectures.provider(name)

    def _duplicate_problems(self) -> list[str]:
        out = []
        for reg in (self.architectures, self.architecture_families, self.model_types, self.converters,
                    self.merge_methods, self.cli_commands, self.file_formats, self.recipe_formats, self.executors):
            for name, providers in reg.duplicates().items():
                out.append(f"{reg.kind} '{name}' is provided by "
                           + " and ".join(f"plugin '{p}'" for p in providers))
        return out

    def provider(self, kind: str, name: str) -> str | None:
        """The plugin providing ``name`` in registry ``kind`` (``converters``, ``model_types`` ...)."""
        return getattr(self, kind).provider(name)

    def warn_once(self, message: str, exc: BaseException | None = None, *, key: str | None = None) -> None:
        """Print ``warning: MESSAGE`` on stderr the first time ``key`` (default: the message) is
        warned about in this host, with the traceback of ``exc`` under ``--debug``."""
        key = message if key is None else key
        if key in self._warned:
            return
        self._warned.add(key)
        print(f"warning: {message}", file=sys.stderr)
        if exc is not None and os.environ.get("MECHA_DEBUG") == "1":
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)

    def contract_problems(self, record: PluginRecord, public_names: Any = ()) -> tuple[list[str], list[str]]:
        """``(errors, warnings)`` of a plugin's specs under :mod:`mecha_core.validate`: every
        load-time error (the record's ``error`` shows only the first) and the check-only
        warnings of the specs that passed. Runs the plugin's detectors on an empty key set."""
        from .validate import spec_warnings

        errors: list[str] = []
        warnings: list[str] = []
        for spec in record.specs:
            problems = spec_errors(spec)
            if not problems and isinstance(spec, LazyArchitecture):  # check the table it builds
                spec, problems = self._built_for_check(spec)
            if problems:
                errors += problems
                continue
            warnings += spec_warnings(spec, public_names, call=lambda fn: fn())
        return errors, warnings

    @staticmethod
    def _built_for_check(lazy: LazyArchitecture) -> tuple[Any, list[str]]:
        """A lazy architecture's table and its problems, for ``plugins check``."""
        try:
            arch = lazy.build()
        except PLUGIN_FAILURES as exc:
            return lazy, [f"architecture '{lazy.name}': build() raised {describe_exception(exc)}"]
        return arch, lazy_table_errors(lazy, arch)

    def reference_warnings(self) -> list[str]:
        """Converters (of loaded plugins) naming a model type or architecture nobody provides."""
        from .validate import reference_warnings

        converters = [(r.name, c) for r in self.records if r.status == "ok"
                      for c in r.specs if isinstance(c, Converter)]
        known_archs = set(self.architectures.names())
        return reference_warnings(converters, set(self.model_types.names()), known_archs)

    def problems(self) -> list[str]:
        """Every problem ``mecha plugins check`` reports: failed plugins, names claimed twice, ..."""
        out = [f"plugin '{r.name}': {r.error}" for r in self.records if r.status == "error"]
        return out + self._duplicate_problems() + list(self.warnings)


# Re-entrant: a plugin being imported during discovery may itself touch mecha_core (for example
# ``from mecha_core import some_name``); that must fail as an import error, not deadlock.
_lock = threading.RLock()
_host: PluginHost | None = None
_discovering_thread: int | None = None


def discovering() -> bool:
    """Whether this thread is in the middle of discovering plugins (importing them)."""
    return _discovering_thread == threading.get_ident()


def get_host() -> PluginHost:
    """The process-wide host, discovering plugins on first use."""
    global _host, _discovering_thread
    with _lock:
        if _host is None:
            if discovering():
                raise PluginError("a plugin used the plugin host while plugins were being loaded; "
                                  "look names up when they are used, not at import time")
            _discovering_thread = threading.get_ident()
            try:
                _host = PluginHost()
            finally:
                _discovering_thread = None
        return _host


@contextlib.contextmanager
def use_host(host: PluginHost) -> Iterator[PluginHost]:
    """Temporarily make ``host`` the process-wide host (tests, embedding applications)."""
    global _host
    with _lock:
        previous, _host = _host, host
    try:
        yield host
    finally:
        with _lock:
            _host = previous


def reset_host() -> None:
    """Forget the discovered plugins; the next use discovers them again."""
    global _host
    with _lock:
        _host = None


def plugin_from_functions(name: str, **hooks: Any) -> types.SimpleNamespace:
    """A plugin object from plain functions: ``plugin_from_functions('x', mecha_merge_methods=f)``."""
    ns = types.SimpleNamespace()
    for hook, fn in hooks.items():
        setattr(ns, hook, hookimpl(fn))
    ns.__name__ = name
    return ns
