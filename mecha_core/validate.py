"""The spec contract: what a plugin's hooks may return, checked once for the loader and the tests.

Two levels:

- :func:`spec_errors` — problems that would break the core (a wrong type where the engine reads a
  field, a block a key names that does not exist, an unknown merge space ...). The loader runs
  these on every spec a plugin returns; one error marks the whole plugin ``error`` and none of
  its specs is registered, so commands that never use it are unaffected.
- :func:`spec_warnings` — quality problems that do not break anything (a method without a
  docstring, a name recipes cannot write, a detector that claims an empty file ...). Only
  ``mecha plugins check`` and :func:`mecha_core.testing.check_plugin` run these: they may call
  plugin code, and loading must stay cheap.

Every message is one line naming the spec and the field, e.g.
``architecture 'tiny': keys must be a mapping of key name to KeySpec, got list``.

This module imports no torch: it runs during plugin discovery, which light commands do too.
"""

from __future__ import annotations

import keyword
import numbers
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from .method import MergeMethod
from .specs import (DELTA, MERGE_SPACES, WEIGHT, Architecture, ArchitectureFamily, CliCommand, Converter, Executor,
                    FileFormat, KeySpec, LazyArchitecture, ModelType, RecipeFormat)

#: The dtype names a safetensors file can store (``mecha_core.engine.safetensors_io.DTYPES``;
#: a test keeps the two equal, this copy avoids importing torch while plugins load).
STORABLE_DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
})

#: The commands of mecha-core itself; a plugin's CLI command may not take one of these names.
CORE_COMMANDS = frozenset({"merge", "compose", "methods", "info", "inspect", "plugins", "recipe"})

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_COMMAND = re.compile(r"[a-z][a-z0-9-]*")
_MAX_SHOWN = 60


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _type(value: Any) -> str:
    return type(value).__name__


def _is_str_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def _label(kind: str, spec: Any) -> str:
    name = getattr(spec, "name", None)
    return f"{kind} {name!r}" if isinstance(name, str) else f"{kind} with name {_show(name)}"


def _name_errors(where: str, spec: Any) -> list[str]:
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name.strip():
        return [f"{where}: name must be a non-empty str, got {_show(name)}"]
    return []


def _optional_str(where: str, field: str, value: Any) -> list[str]:
    if value is not None and not isinstance(value, str):
        return [f"{where}: {field} must be a str or None, got {_type(value)}"]
    return []


def _str_field(where: str, field: str, value: Any, *, empty: bool = True) -> list[str]:
    if not isinstance(value, str) or (not empty and not value):
        return [f"{where}: {field} must be a {'' if empty else 'non-empty '}str, got {_show(value)}"]
    return []


# -- architectures ------------------------------------------------------------------------------
def _plain_key(key: Any, spec: Any, blocks: set[str], classes: set[str]) -> bool:
    """Whether a key passes every check of :func:`_key_errors` (exact types only: anything
    unusual goes through the full checks). Every plugin's tables are checked on every start-up,
    ~24,000 keys; this costs a third of the full checks, which build messages as they go."""
    if type(key) is not str or not key or type(spec) is not KeySpec:
        return False
    shape, aliases, in_blocks, klass = spec.shape, spec.aliases, spec.blocks, spec.klass
    return (type(shape) is tuple and all(type(d) is int and d >= 0 for d in shape)
            and type(spec.dtype) is str and spec.dtype in STORABLE_DTYPES
            and type(spec.component) is str and spec.component != "" and type(spec.optional) is bool
            and type(aliases) is tuple and all(type(v) is str for v in aliases)
            and type(in_blocks) is tuple and all(type(v) is str and v in blocks for v in in_blocks)
            and (klass is None or (type(klass) is str and klass in classes)))


def _key_errors(where: str, key: Any, spec: Any, blocks: set[str], classes: set[str]) -> list[str]:
    if not isinstance(key, str) or not key:
        return [f"{where}: key names must be non-empty str, got {_show(key)}"]
    at = f"{where}: key '{key}'"
    if not isinstance(spec, KeySpec):
        return [f"{at} must map to a KeySpec, got {_type(spec)}"]
    shape = spec.shape
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape):
        return [f"{at} has shape {_show(shape)}; use a tuple of non-negative ints"]
    if not isinstance(spec.dtype, str) or spec.dtype not in STORABLE_DTYPES:
        return [f"{at} has dtype {_show(spec.dtype)}, not a torch dtype name safetensors can store "
                f"(float16, bfloat16, float32, ...)"]
    if not isinstance(spec.component, str) or not spec.component:
        return [f"{at}: component must be a non-empty str, got {_show(spec.component)}"]
    if not isinstance(spec.optional, bool):
        return [f"{at}: optional must be a bool, got {_type(spec.optional)}"]
    for field in ("aliases", "blocks"):
        value = getattr(spec, field)
        if not _is_str_tuple(value):
            return [f"{at}: {field} must be a tuple of str, got {_show(value)}"]
    if spec.klass is not None and not isinstance(spec.klass, str):
        return [f"{at}: klass must be a str or None, got {_type(spec.klass)}"]
    unknown = [b for b in spec.blocks if b not in blocks]
    if unknown:
        return [f"{at} is in blocks {unknown[:3]} that the architecture does not list"]
    if spec.klass is not None and spec.klass not in classes:
        return [f"{at} has class '{spec.klass}' that the architecture does not list"]
    return []


def architecture_errors(arch: Architecture) -> list[str]:
    where = _label("architecture", arch)
    out = _name_errors(where, arch)
    for field in ("blocks", "classes", "aliases"):
        value = getattr(arch, field)
        if not _is_str_tuple(value):
            out.append(f"{where}: {field} must be a tuple of str, got {_show(value)}")
        elif len(set(value)) != len(value):
            twice = sorted({v for v in value if value.count(v) > 1})
            out.append(f"{where}: {field} list {twice[:3]} more than once")
    out += _str_field(where, "description", arch.description)
    if not isinstance(arch.component_aliases, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in arch.component_aliases.items()):
        out.append(f"{where}: component_aliases must be a mapping of str to str, got {_show(arch.component_aliases)}")
    mm = arch.min_match
    if not isinstance(mm, numbers.Real) or isinstance(mm, bool) or not 0 < mm <= 1:
        out.append(f"{where}: min_match must be a number in (0, 1], got {_show(mm)}")
    for field in ("layers", "vocab_keys"):
        if not _is_str_tuple(getattr(arch, field)):
            out.append(f"{where}: {field} must be a tuple of str, got {_show(getattr(arch, field))}")
    if not isinstance(arch.keys, Mapping):
        out.append(f"{where}: keys must be a mapping of key name to KeySpec, got {_type(arch.keys)}")
        return out
    if out:  # the key checks below read blocks and classes as tuples of str
        return out
    blocks, classes = set(arch.blocks), set(arch.classes)
    stray = [b for b in arch.layers if b not in blocks]
    if stray:
        return [f"{where}: layers {stray[:3]} are not in its blocks"]
    unlisted = [k for k in arch.vocab_keys if k not in arch.keys]
    if unlisted:
        return [f"{where}: vocab_keys {unlisted[:3]} are not keys of the architecture"]
    for key, spec in arch.keys.items():
        if _plain_key(key, spec, blocks, classes):
            continue
        problems = _key_errors(where, key, spec, blocks, classes)
        if problems:
            return problems  # one bad key is enough to say; thousands would drown the line
    owner: dict[str, str] = {}
    for key, spec in arch.keys.items():
        for alias in spec.aliases:
            if alias in arch.keys:
                return [f"{where}: alias '{alias}' of key '{key}' is also a key of the architecture"]
            if alias in owner:
                other = owner[alias]
                return [f"{where}: alias '{alias}' is given to both key '{other}' and key '{key}'"
                        if other != key else f"{where}: key '{key}' lists alias '{alias}' twice"]
            owner[alias] = key
    return out


def architecture_warnings(arch: Architecture) -> list[str]:
    where = f"architecture '{arch.name}'"
    out: list[str] = []
    if not arch.keys:
        out.append(f"{where} has no keys")
    for what, names in (("blocks", arch.blocks), ("classes", arch.classes)):
        bad = [n for n in names if not _NAME.fullmatch(n)]
        if bad:
            out.append(f"{where}: {what} {bad[:3]} are not names a recipe can write (letters, digits, _)")
    return out


def lazy_architecture_errors(lazy: LazyArchitecture) -> list[str]:
    """The load-time checks of a :class:`LazyArchitecture`: its own fields (the table is checked
    when it is built, by :func:`lazy_table_errors`)."""
    where = _label("architecture", lazy)
    out = _name_errors(where, lazy)
    if not callable(lazy.build):
        out.append(f"{where}: build must be callable, got {_type(lazy.build)}")
    if not _is_str_tuple(lazy.key_prefixes) or not all(lazy.key_prefixes):
        out.append(f"{where}: key_prefixes must be a tuple of non-empty str, got {_show(lazy.key_prefixes)}")
    count = lazy.required_keys
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        out.append(f"{where}: required_keys must be an int >= 0, got {_show(count)}")
    mm = lazy.min_match
    if not isinstance(mm, numbers.Real) or isinstance(mm, bool) or not 0 < mm <= 1:
        out.append(f"{where}: min_match must be a number in (0, 1], got {_show(mm)}")
    if not _is_str_tuple(lazy.aliases):
        out.append(f"{where}: aliases must be a tuple of str, got {_show(lazy.aliases)}")
    return out


def lazy_table_errors(lazy: LazyArchitecture, arch: Any) -> list[str]:
    """Problems of the table a :class:`LazyArchitecture` built: not an :class:`Architecture`, one
    that breaks :func:`architecture_errors`, or one that disagrees with what the lazy spec said
    about it (detection trusted those fields to skip the table for files it cannot match)."""
    where = f"architecture '{lazy.name}'"
    if not isinstance(arch, Architecture):
        return [f"{where}: build() returned {_type(arch)}, expected Architecture"]
    out = architecture_errors(arch)
    if out:
        return out
    for field in ("name", "aliases", "min_match"):
        if getattr(arch, field) != getattr(lazy, field):
            out.append(f"{where}: build() gave {field} {_show(getattr(arch, field))}, "
                       f"but the LazyArchitecture says {_show(getattr(lazy, field))}")
    required = [key for key, spec in arch.keys.items() if not spec.optional]
    if len(required) != lazy.required_keys:
        out.append(f"{where}: the table has {len(required)} required keys, but the LazyArchitecture "
                   f"says required_keys={lazy.required_keys}")
    for key in required:
        stray = [name for name in (key, *arch.keys[key].aliases) if not name.startswith(lazy.key_prefixes)]
        if stray:
            out.append(f"{where}: required key '{key}' has name '{stray[0]}', which starts with none of "
                       f"key_prefixes {_show(lazy.key_prefixes)}")
            break
    return out


# -- architecture families ----------------------------------------------------------------------
def family_errors(family: ArchitectureFamily) -> list[str]:
    where = _label("architecture family", family)
    out = _name_errors(where, family)
    if not callable(family.detect):
        out.append(f"{where}: detect must be callable, got {_type(family.detect)}")
    out += _str_field(where, "description", family.description)
    return out


def family_warnings(family: ArchitectureFamily, call: Callable[[Callable[[], Any]], Any]) -> list[str]:
    where = f"architecture family '{family.name}'"
    out = []
    if not _NAME.fullmatch(family.name):
        out.append(f"{where}: the name is not one a recipe can write in a map (letters, digits, _)")
    try:
        empty = call(lambda: family.detect({}, None))
    except (Exception, SystemExit) as exc:  # detect runs on every file no fixed layout claims
        return out + [f"{where}: detect({{}}, None) raised {type(exc).__name__}: {exc}"]
    if empty is not None:
        out.append(f"{where}: detect({{}}, None) must be None (an empty file is no member), got {_show(empty)}")
    return out


# -- model types --------------------------------------------------------------------------------
def model_type_errors(model_type: ModelType) -> list[str]:
    where = _label("model type", model_type)
    out = _name_errors(where, model_type)
    if model_type.space not in (WEIGHT, DELTA):
        out.append(f"{where}: space must be '{WEIGHT}' or '{DELTA}', got {_show(model_type.space)}")
    if not callable(model_type.detect):
        out.append(f"{where}: detect must be callable, got {_type(model_type.detect)}")
    out += _str_field(where, "description", model_type.description)
    return out


def model_type_warnings(model_type: ModelType, call: Callable[[Callable[[], Any]], Any]) -> list[str]:
    where = f"model type '{model_type.name}'"
    try:
        empty = call(lambda: model_type.detect(frozenset()))
    except (Exception, SystemExit) as exc:  # a detector runs on every file opened: it must never raise
        return [f"{where}: detect(frozenset()) raised {type(exc).__name__}: {exc}"]
    if empty is not False:
        return [f"{where}: detect(frozenset()) must be False (an empty file is of no type), got {empty!r}"]
    return []


# -- converters ---------------------------------------------------------------------------------
def converter_errors(converter: Converter) -> list[str]:
    where = _label("converter", converter)
    out = _name_errors(where, converter)
    for field in ("source_arch", "target_arch"):
        out += _optional_str(where, field, getattr(converter, field))
    for field in ("source_type", "target_type"):
        value = getattr(converter, field)
        out += _str_field(where, field, value, empty=False)
        if value in MERGE_SPACES and value != DELTA:
            out.append(f"{where}: {field} '{value}' is a merge space, not a model type "
                       f"(weights are model type 'base', differences 'delta')")
    if not callable(converter.plan):
        out.append(f"{where}: plan must be callable, got {_type(converter.plan)}")
    out += _str_field(where, "description", converter.description)
    if not out and (converter.source_arch, converter.source_type) == (converter.target_arch, converter.target_type):
        out.append(f"{where} converts ({converter.source_arch}, {converter.source_type}) to itself")
    return out


# -- merge methods ------------------------------------------------------------------------------
def method_errors(method: Any) -> list[str]:
    where = _label("merge method", method)
    out = _name_errors(where, method)
    if not callable(method.function):
        out.append(f"{where}: function must be callable, got {_type(method.function)}")
    if method.check_spaces is not None and not callable(method.check_spaces):
        out.append(f"{where}: check_spaces must be callable or None, got {_type(method.check_spaces)}")
    for space in [i.space for i in method.inputs] + [method.returns]:
        if space is not None and space not in MERGE_SPACES:
            out.append(f"{where}: unknown merge space {_show(space)} (known: {', '.join(MERGE_SPACES)})")
    for field in ("doc", "formula"):
        out += _str_field(where, field, getattr(method, field))
    return out


def method_warnings(method: Any, public_names: Iterable[str]) -> list[str]:
    where = f"merge method '{method.name}'"
    out: list[str] = []
    if not _NAME.fullmatch(method.name) or keyword.iskeyword(method.name):
        out.append(f"{where}: the name must be a Python identifier (recipes and mecha_core.<name> use it)")
    elif method.name in set(public_names):
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
    return out


# -- CLI commands -------------------------------------------------------------------------------
def cli_command_errors(command: CliCommand) -> list[str]:
    where = _label("cli command", command)
    out = _name_errors(where, command)
    if not out and not _COMMAND.fullmatch(command.name):
        out.append(f"{where}: the name must be lower-case letters, digits and '-', starting with a letter")
    elif not out and command.name in CORE_COMMANDS:
        out.append(f"{where} conflicts with the core command 'mecha {command.name}'; choose another name")
    out += _str_field(where, "help", command.help)
    if not _is_command_object(command.app):
        out.append(f"{where}: app must be a typer.Typer, got {_type(command.app)}")
    return out


def _is_command_object(app: Any) -> bool:
    # a Typer instance means typer is imported already: checking must not import it (library users
    # of mecha_core never need the command line)
    typer = sys.modules.get("typer")
    return typer is not None and isinstance(app, typer.Typer)


def cli_command_warnings(command: CliCommand) -> list[str]:
    if not command.help.strip():
        return [f"cli command '{command.name}' has no help text (`mecha --help` shows it)"]
    return []


# -- file formats -------------------------------------------------------------------------------
def file_format_errors(fmt: FileFormat) -> list[str]:
    where = _label("file format", fmt)
    out = _name_errors(where, fmt)
    if not _is_str_tuple(fmt.suffixes) or not fmt.suffixes:
        out.append(f"{where}: suffixes must be a non-empty tuple of strings, got {_show(fmt.suffixes)}")
    else:
        for suffix in fmt.suffixes:
            if not suffix.startswith(".") or suffix != suffix.lower() or suffix == ".safetensors":
                out.append(f"{where}: suffix {_show(suffix)} must be lower case, start with '.', "
                           f"and not be .safetensors")
    if not callable(fmt.open):
        out.append(f"{where}: open must be callable, got {_type(fmt.open)}")
    out += _str_field(where, "description", fmt.description)
    return out


# -- recipe formats -----------------------------------------------------------------------------
def recipe_format_errors(recipe_format: RecipeFormat) -> list[str]:
    where = _label("recipe format", recipe_format)
    out = _name_errors(where, recipe_format)
    for field in ("detect", "read"):
        if not callable(getattr(recipe_format, field)):
            out.append(f"{where}: {field} must be callable, got {_type(getattr(recipe_format, field))}")
    out += _str_field(where, "description", recipe_format.description)
    return out


def recipe_format_warnings(recipe_format: RecipeFormat, call: Callable[[Callable[[], Any]], Any]) -> list[str]:
    where = f"recipe format '{recipe_format.name}'"
    out = []
    for text in ("", "mecha 1\nmodel a = \"a.safetensors\"\n"):
        try:  # a detector runs on every recipe loaded: it must never raise, nor claim mecha's own format
            claimed = call(lambda t=text: recipe_format.detect(t, None))
        except (Exception, SystemExit) as exc:
            return [f"{where}: detect({text[:8]!r}, None) raised {type(exc).__name__}: {exc}"]
        if claimed is not False:
            out.append(f"{where}: detect({text[:8]!r}, None) must be False (empty text and mecha's own "
                       f"format are never another format's), got {claimed!r}")
    if not recipe_format.description.strip():
        out.append(f"{where} has no description (`mecha plugins list -v` shows it)")
    return out


# -- executors ----------------------------------------------------------------------------------
def executor_errors(executor: Executor) -> list[str]:
    where = _label("executor", executor)
    out = _name_errors(where, executor)
    if not out and not _COMMAND.fullmatch(executor.name):
        out.append(f"{where}: the name must be lower-case letters, digits and '-', starting with a letter")
    elif not out and executor.name == "local":
        out.append(f"{where} conflicts with the core's executor 'local'; choose another name")
    if not callable(executor.run):
        out.append(f"{where}: run must be callable, got {_type(executor.run)}")
    if not _is_str_tuple(executor.settings):
        out.append(f"{where}: settings must be a tuple of str, got {_show(executor.settings)}")
    out += _str_field(where, "description", executor.description)
    return out


_ERRORS: dict[type, Callable[[Any], list[str]]] = {
    MergeMethod: method_errors,
    Architecture: architecture_errors,
    LazyArchitecture: lazy_architecture_errors,
    ArchitectureFamily: family_errors,
    ModelType: model_type_errors,
    Converter: converter_errors,
    CliCommand: cli_command_errors,
    FileFormat: file_format_errors,
    RecipeFormat: recipe_format_errors,
    Executor: executor_errors,
}


def spec_errors(spec: Any) -> list[str]:
    """Load-time problems of one spec returned by a hook (empty when it is usable)."""
    check = _ERRORS.get(type(spec))
    if check is None:
        return [f"{type(spec).__name__} is not a spec the core knows"]
    try:
        return check(spec)
    except (Exception, SystemExit) as exc:  # a spec so odd that reading it raised (a custom Mapping ...)
        return [f"{_label(type(spec).__name__, spec)}: could not be read: {type(exc).__name__}: {exc}"]


def spec_warnings(spec: Any, public_names: Iterable[str] = (),
                  call: Callable[[Callable[[], Any]], Any] = lambda f: f()) -> list[str]:
    """``plugins check``-only problems of a spec that passed :func:`spec_errors`.

    ``public_names``: ``mecha_core.__all__`` (a method may not hide one; passed in because this
    module sits below the package); ``call`` runs plugin code (a detector) so the caller can guard it.
    """
    if isinstance(spec, MergeMethod):
        return method_warnings(spec, public_names)
    if isinstance(spec, Architecture):
        return architecture_warnings(spec)
    if isinstance(spec, ModelType):
        return model_type_warnings(spec, call)
    if isinstance(spec, ArchitectureFamily):
        return family_warnings(spec, call)
    if isinstance(spec, CliCommand):
        return cli_command_warnings(spec)
    if isinstance(spec, RecipeFormat):
        return recipe_format_warnings(spec, call)
    return []


def reference_warnings(converters: Iterable[tuple[str, Converter]], model_types: set[str],
                       architectures: set[str]) -> list[str]:
    """Converters naming a model type or architecture no loaded plugin provides (the provider may
    be disabled, so this is a warning, not a load error)."""
    out = []
    for plugin, conv in converters:
        for field in ("source_type", "target_type"):
            value = getattr(conv, field)
            if value not in model_types:
                out.append(f"plugin '{plugin}': converter '{conv.name}': {field} '{value}' is a model type "
                           f"no loaded plugin defines")
        for field in ("source_arch", "target_arch"):
            value = getattr(conv, field)
            if value is not None and value not in architectures:
                out.append(f"plugin '{plugin}': converter '{conv.name}': {field} '{value}' is an "
                           f"architecture no loaded plugin defines")
    return out
