"""``mecha methods``, ``mecha info``, ``mecha inspect`` and ``mecha plugins``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import MechaError
from ..plugins import get_host
from .common import print_json, printable


def counted(n: int, plural: str) -> str:
    """``1 architecture``, ``2 architectures`` (``plural`` is the noun's plural)."""
    return f"{n} {plural[:-1] if n == 1 and plural.endswith('s') else plural}"


def method_summary(method: Any) -> dict[str, Any]:
    """A method as plain data (used by ``mecha methods --json`` and docs/methods.md)."""
    return {
        "name": method.name,
        "inputs": [{"name": i.name, "space": i.space, "optional": i.optional, "variadic": i.variadic}
                   for i in method.inputs],
        "hyperparameters": [{"name": h.name, "default": h.default,
                             "type": h.kind.__name__ if h.kind else None} for h in method.hyperparameters],
        "returns": method.returns,
        "formula": method.formula,
        "doc": method.doc,
    }


def method_signature(method: Any) -> str:
    parts = []
    for i in method.inputs:
        text = ("*" if i.variadic else "") + i.name + (f": {i.space}" if i.space else "")
        parts.append(text + ("=None" if i.optional else ""))
    if method.hyperparameters:
        parts.append("*")
        parts += [f"{h.name}={h.default!r}" for h in method.hyperparameters]
    returns = method.returns or "same space as inputs"
    return f"{method.name}({', '.join(parts)}) -> {returns}"


def methods_command(
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", help="Show one method in full.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the merge methods with their inputs, hyperparameters and defaults."""
    host = get_host()
    methods = [host.method(name)] if name else host.merge_methods.values()
    if json_out:
        data = [dict(method_summary(m), plugin=host.merge_methods.provider(m.name)) for m in methods]
        print_json(data[0] if name else data)
        return
    for m in methods:
        typer.echo(method_signature(m))
        if name:
            if m.formula:
                typer.echo(f"  = {m.formula}")
            if m.doc:
                typer.echo("")
                typer.echo("\n".join("  " + line for line in m.doc.splitlines()))
            typer.echo(f"\n  plugin: {host.merge_methods.provider(m.name)}")
        elif m.doc:
            typer.echo(f"    {m.doc.splitlines()[0]}")


def _converters_of(host: Any, arch_name: str) -> list[dict[str, Any]]:
    out = []
    for conv in host.converters.values():
        if arch_name in (conv.source_arch, conv.target_arch):
            out.append({"name": conv.name, "from": conv.source_arch, "from_type": conv.source_type,
                        "to": conv.target_arch, "to_type": conv.target_type,
                        "plugin": host.converters.provider(conv.name)})
    return out


def architecture_summary(arch: Any, verbose: bool, host: Any = None) -> dict[str, Any]:
    """An architecture as plain data (``mecha info ARCH --json``): counts always, key lists with -v."""
    comps: dict[str, list[str]] = {}
    blocks: dict[str, list[str]] = {b: [] for b in arch.blocks}
    classes: dict[str, list[str]] = {c: [] for c in arch.classes}
    for key, spec in arch.keys.items():
        comps.setdefault(spec.component, []).append(key)
        for b in spec.blocks:
            blocks.setdefault(b, []).append(key)
        if spec.klass:
            classes.setdefault(spec.klass, []).append(key)
    out: dict[str, Any] = {
        "name": arch.name, "description": arch.description, "aliases": list(arch.aliases),
        "keys": len(arch.keys), "required_keys": len(arch.required_keys), "min_match": arch.min_match,
        "components": {c: len(k) for c, k in comps.items()},
        "component_aliases": dict(arch.component_aliases),
        "blocks": list(arch.blocks), "classes": list(arch.classes),
        "block_sizes": {b: len(k) for b, k in blocks.items()},
        "class_sizes": {c: len(k) for c, k in classes.items()},
    }
    if host is not None:
        out["plugin"] = host.architectures.provider(arch.name)
        out["converters"] = _converters_of(host, arch.name)
    if verbose:
        out["component_keys"], out["block_keys"], out["class_keys"] = comps, blocks, classes
    return out


def _sized(table: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in table.items()) or "none"


def info_command(
    arch: Annotated[Optional[str], typer.Argument(metavar="ARCH",
                                                  help="An architecture to describe (its name or an alias).")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                          help="List the keys of each component, block and class.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List architectures, or describe one: components, blocks and classes (with -v, their keys).

    Block-wise and class-wise hyperparameters name these blocks and classes:
    blocks("sd1-ldm", default=0.3, IN02=0.75), classes("sd1-ldm", mlp_fc1=0.2).
    """
    host = get_host()
    if arch is None:
        archs = list(host.architectures.values())
        if json_out:
            print_json([{"name": a.name, "description": a.description, "keys": len(a.keys),
                         "aliases": list(a.aliases), "blocks": len(a.blocks), "classes": len(a.classes),
                         "plugin": host.architectures.provider(a.name)} for a in archs])
            return
        if not archs:
            typer.echo("no architectures installed (any safetensors file still merges by key)")
        for a in archs:
            also = f"  (also: {', '.join(a.aliases)})" if a.aliases else ""
            typer.echo(f"{a.name:<16} {len(a.keys):>5} {'key ' if len(a.keys) == 1 else 'keys'}  {a.description}{also}")
        for f in host.architecture_families.values():  # layouts computed per file (`mecha inspect FILE`)
            typer.echo(f"{f.name:<16} family  {f.description}")
        return
    family = host.architecture_families.get(arch) if arch not in host.architectures else None
    if family is not None:
        found = {"name": family.name, "family": True, "description": family.description,
                 "plugin": host.architecture_families.provider(family.name)}
        if json_out:
            print_json(found)
            return
        typer.echo(f"{family.name}: architecture family: {family.description}")
        typer.echo(f"  plugin: {found['plugin']}; its blocks and classes depend on the file: "
                   f"`mecha inspect FILE` shows a member's")
        return
    summary = architecture_summary(host.architecture(arch), verbose, host)
    if json_out:
        print_json(summary)
        return
    typer.echo(f"{summary['name']}: {summary['description']}")
    typer.echo(f"  plugin: {summary['plugin']}" + (f"; also named {', '.join(summary['aliases'])}"
                                                    if summary["aliases"] else ""))
    typer.echo(f"  keys: {summary['keys']} ({summary['required_keys']} required)")
    typer.echo(f"  components: {_sized(summary['components'])}")
    if summary["component_aliases"]:
        typer.echo("  component aliases: " + ", ".join(f"{a}={c}" for a, c in summary["component_aliases"].items()))
    typer.echo(f"  blocks ({len(summary['blocks'])}): {_sized(summary['block_sizes'])}")
    typer.echo(f"  classes ({len(summary['classes'])}): {_sized(summary['class_sizes'])}")
    for conv in summary["converters"]:
        typer.echo(f"  converter {conv['name']}: {conv['from'] or 'any'} ({conv['from_type']}) -> "
                   f"{conv['to'] or 'same'} ({conv['to_type']})")
    if verbose:
        for title, table in (("component", summary["component_keys"]), ("block", summary["block_keys"]),
                             ("class", summary["class_keys"])):
            for name, keys in table.items():
                typer.echo(f"\n  {title} {name} ({counted(len(keys), 'keys')}):")
                for k in keys:
                    typer.echo(f"    {printable(k)}")


def _closest(keys: frozenset[str], host: Any) -> tuple[str, float] | None:
    """The architecture holding most of its required keys in ``keys`` (for files none matches)."""
    best = None
    for arch in host.architectures.values():
        required = arch.required_keys
        if not required:
            continue
        aliases = {a: k for k, s in arch.keys.items() for a in s.aliases}
        score = len(required & {aliases.get(k, k) for k in keys}) / len(required)
        if score > 0 and (best is None or score > best[1]):
            best = (arch.name, score)
    return best


def _stored_view(f: Any) -> tuple[Any, dict[str, str], dict[str, int]]:
    """What is stored under each model key: the file that holds the bytes (a dequantising view's
    inner file), each key's stored dtype and its stored bytes (an fp8 weight's scale counted with
    it; a plugin format's quantised blocks as the plugin reports them)."""
    from ..engine.quantized import DequantisedFile
    from ..engine.safetensors_io import ITEMSIZE
    from ..engine.sources import FormatFile

    if isinstance(f, DequantisedFile):
        inner = f.file
        dtypes = {k: inner.keys[k].dtype for k in f.keys}
        sizes = {k: inner.nbytes(k) + (inner.nbytes(f.scales[k]) if k in f.scales else 0) for k in f.keys}
        return inner, dtypes, sizes
    if isinstance(f, FormatFile):
        opened = f.opened
        dtype_of = getattr(opened, "stored_dtype", None)
        size_of = getattr(opened, "nbytes", None)
        dtypes = {k: dtype_of(k) if dtype_of else info.dtype for k, info in f.keys.items()}
        sizes = {k: size_of(k) if size_of else info.numel * ITEMSIZE.get(info.dtype, 4) for k, info in f.keys.items()}
        return f, dtypes, sizes
    return f, {k: info.dtype for k, info in f.keys.items()}, {k: f.nbytes(k) for k in f.keys}


def inspect_summary(path: Path, host: Any) -> dict[str, Any]:
    """What ``mecha inspect`` reports, from the header alone (no tensor is read)."""
    from ..engine.families import detect_family
    from ..engine.folders import FolderFile
    from ..engine.quantized import DequantisedFile
    from ..engine.sources import FormatFile, detect_architecture, detect_type, open_weights

    f = open_weights(str(path), host)  # what a merge reads: plugin formats, fp8 scales folded in
    try:
        keys = frozenset(f.keys)
        type_ = detect_type(str(path), keys, host)
        arch = detect_architecture(str(path), keys, host) if type_ in ("base", "delta") else None
        if arch is None and type_ in ("base", "delta"):  # a family member (llama-32l ...)
            arch = detect_family(str(path), f.keys, host)
        stored, stored_dtypes, sizes = _stored_view(f)
        dtypes: dict[str, int] = {}
        for dtype in stored_dtypes.values():
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
        result: dict[str, Any] = {
            "file": str(path), "architecture": arch.name if arch else None, "type": type_,
            "keys": len(keys), "dtypes": dict(sorted(dtypes.items())), "bytes": sum(sizes.values()),
            "has_recipe": "mecha_recipe" in f.metadata,
            "parameters": sum(info.numel for info in f.keys.values()),
        }
        if isinstance(f, FormatFile):  # stored dtypes may be quantised blocks; a read gives real weights
            result["format"] = f.fmt.name
            read_as: dict[str, int] = {}
            for info in f.keys.values():
                read_as[info.dtype] = read_as.get(info.dtype, 0) + 1
            result["read_as"] = dict(sorted(read_as.items()))
        if isinstance(f, DequantisedFile):  # the scales are folded into their weights, as a merge reads them
            result["scaled_fp8_weights"] = len(f.scales)
        if isinstance(stored, FolderFile):  # a folder or an index: which files hold the keys
            result["folder"] = stored.path
            per_file: dict[str, dict[str, Any]] = {p: {"keys": 0, "bytes": 0, "dtypes": {}} for p in stored.paths}
            for key in f.keys:
                entry = per_file[stored.file_of(key)]
                entry["keys"] += 1
                entry["bytes"] += sizes[key]
                entry["dtypes"][stored_dtypes[key]] = entry["dtypes"].get(stored_dtypes[key], 0) + 1
            result["shards"] = [{"file": os.path.relpath(p, stored.path), **v} for p, v in per_file.items()]
        if arch is not None:
            result["architecture_description"] = arch.description
            result["blocks"] = len(arch.blocks)
        if arch is not None and host.family_of(arch.name) is not None:  # a layout computed for this file
            result["family"] = host.family_of(arch.name)
        if arch is None:
            closest = _closest(keys, host) if type_ in ("base", "delta") else None
            result["closest"] = ({"architecture": closest[0], "required_keys_present": round(closest[1], 4)}
                                 if closest else None)
            return result
        aliases = {a: k for k, s in arch.keys.items() for a in s.aliases}
        # in file order (not the frozenset's, which changes from run to run): the same report each time
        canonical = {k: (aliases[k] if k in aliases and aliases[k] not in keys else k) for k in f.keys}
        present = set(canonical.values())
        components: dict[str, dict[str, int]] = {}
        for stored, key in canonical.items():
            spec = arch.keys.get(key)
            entry = components.setdefault(spec.component if spec else "(unexpected)", {"keys": 0, "bytes": 0})
            entry["keys"] += 1
            entry["bytes"] += sizes[stored]
        result.update({
            "converts_to": _conversion_target(arch.name, type_, host),
            "missing": sorted(arch.required_keys - present),
            "missing_optional": len([k for k, s in arch.keys.items() if s.optional and k not in present]),
            "unexpected": sorted(present - set(arch.keys)),
            "renamed": sorted(k for k, c in canonical.items() if c != k),
            "shape_mismatches": sorted(
                ({"key": c, "expected": list(arch.keys[c].shape), "found": list(f.keys[k].shape)}
                 for k, c in canonical.items() if c in arch.keys and f.keys[k].shape != arch.keys[c].shape),
                key=lambda m: m["key"]),
            "components": components,
        })
        return result
    finally:
        f.close()


def _conversion_target(arch_name: str, type_: str, host: Any) -> str | None:
    # the engine follows arch-changing converters that keep the type (diffusers -> ldm naming)
    for conv in host.converters.values():
        if (conv.source_arch == arch_name and conv.source_type == type_ == conv.target_type
                and conv.target_arch not in (None, arch_name)):
            return conv.target_arch
    return None


def inspect_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A .safetensors file, a model folder, an index, "
                                                                "or a file a format plugin reads (.gguf).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Detect a file's architecture and model type from its header; show dtypes, sizes, parameters,
    the shards of a folder, and the missing, unexpected and misshapen keys. No tensor data is read."""
    from ..sizes import format_bytes

    result = inspect_summary(file, get_host())
    if json_out:
        print_json(result)
        return
    arch = result["architecture"]
    described = arch or "unknown architecture"
    if result.get("converts_to"):
        described += f" (read as {result['converts_to']})"
    typer.echo(f"{printable(str(file))}: {described}, type {result['type']}, {result['keys']} keys, "
               f"{format_bytes(result['bytes'])}")
    typer.echo("  dtypes: " + ", ".join(f"{d} ({n})" for d, n in result["dtypes"].items()))
    if result.get("format"):
        typer.echo(f"  format: {result['format']}, read as " +
                   ", ".join(f"{d} ({n})" for d, n in result["read_as"].items()))
    if result.get("scaled_fp8_weights"):
        typer.echo(f"  scaled fp8: {counted(result['scaled_fp8_weights'], 'weights')} read as float32 "
                   f"(weight times its scale); the scale keys are not listed")
    typer.echo(f"  parameters: {result['parameters']:,}")
    if arch is not None:
        typer.echo(f"  architecture: {printable(result['architecture_description'])}; "
                   f"{counted(result['blocks'], 'blocks')}")
    for shard in result.get("shards", ()):
        typer.echo(f"  {printable(shard['file'])}: {counted(shard['keys'], 'keys')}, {format_bytes(shard['bytes'])}, "
                   + ", ".join(f"{d} ({n})" for d, n in shard["dtypes"].items()))
    if arch is None:
        if result.get("closest"):
            c = result["closest"]
            typer.echo(f"  closest: {c['architecture']} ({c['required_keys_present']:.0%} of its required keys; "
                       f"name it with model(..., arch=...) to merge by its names anyway)")
        return
    typer.echo("  components: " + ", ".join(f"{c} ({v['keys']} keys, {format_bytes(v['bytes'])})"
                                            for c, v in result["components"].items()))
    if result["renamed"]:
        typer.echo(f"  old key spellings renamed: {len(result['renamed'])}")
    for what in ("missing", "unexpected"):
        if result[what]:
            typer.echo(f"  {what} keys ({len(result[what])}): " + printable(", ".join(result[what][:10])) +
                       (" ..." if len(result[what]) > 10 else ""))
    if result["shape_mismatches"]:
        shown = [f"{m['key']} {tuple(m['found'])} (expected {tuple(m['expected'])})"
                 for m in result["shape_mismatches"][:5]]
        typer.echo(f"  wrong shapes ({len(result['shape_mismatches'])}): " + printable("; ".join(shown)))


def _diagnostic_host() -> Any:
    """The process-wide host; under MECHA_STRICT_PLUGINS=1 a failure would stop the listing, so
    the plugin commands then load a non-strict host that records every problem instead."""
    from ..errors import PluginError
    from ..plugins import PluginHost

    try:
        return get_host()
    except PluginError:
        return PluginHost(strict=False)


def plugins_list_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List everything each plugin provides.")] = False,
) -> None:
    """List every plugin, builtin or not, with its status and what it provides (always exits 0)."""
    host = _diagnostic_host()
    rows = [r.as_dict() for r in host.records]
    if json_out:
        print_json(rows)
        return
    if not rows:
        typer.echo("no plugins installed")
    else:
        typer.echo(f"{'name':<10} {'distribution':<16} {'version':<10} {'status':<8} provides")
    for r in rows:
        provides = ", ".join(counted(len(v), k.replace('_', ' ')) for k, v in r["provides"].items()) or "nothing"
        line = f"{r['name']:<10} {r['distribution'] or '-':<16} {r['version'] or '-':<10} {r['status']:<8} {provides}"
        typer.echo(line)
        if r["error"]:
            typer.echo(f"    error: {printable(r['error'])}")
        if verbose:
            typer.echo(f"    module: {r['module'] or '-'}")
            for kind, names in r["provides"].items():
                typer.echo(f"    {kind.replace('_', ' ')}: {', '.join(names)}")
    for warning in host.warnings:
        typer.echo(f"warning: {printable(warning)}", err=True)


def plugin_check_report(host: Any) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of ``mecha plugins check``: the same contract as
    :func:`mecha_core.testing.check_plugin`, over every installed plugin.

    Problems: plugins that failed to load (every contract error of their specs, not only the
    first), names claimed twice, an allow list naming a plugin that is not installed. Warnings
    (exit status 0): the check-only rules, and converters naming a model type or architecture
    no loaded plugin provides."""
    import mecha_core

    problems = host.problems()
    warnings: list[str] = []
    for record in host.records:
        if record.status == "disabled":
            continue
        errors, warned = host.contract_problems(record, mecha_core.__all__)
        if record.status == "error":
            problems += [f"plugin '{record.name}': {e}" for e in errors[1:]]  # the first is its error
        warnings += [f"plugin '{record.name}': {w}" for w in warned]
    return problems, warnings + host.reference_warnings()


def plugins_check_command(
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print {\"ok\", \"problems\", \"warnings\"} as JSON on stdout.")] = False,
) -> None:
    """Exit non-zero if a plugin failed to load or breaks the spec contract, or two plugins claim
    one name; also print the check-only warnings (docstrings, names recipes cannot write ...)."""
    problems, warnings = plugin_check_report(_diagnostic_host())
    for p in problems:
        typer.echo(f"problem: {printable(p)}", err=True)
    for w in warnings:
        typer.echo(f"warning: {printable(w)}", err=True)
    if json_out:
        print_json({"ok": not problems, "problems": list(problems), "warnings": list(warnings)})
    if problems:
        summary = (f"{len(problems)} plugin problem{'s' if len(problems) > 1 else ''}; "
                   f"`mecha plugins list` shows every plugin")
        if json_out:  # the result above already says what failed: one JSON document on stdout
            typer.echo(f"error: {summary}", err=True)
            raise typer.Exit(MechaError.exit_code)
        raise MechaError(summary)
    if not json_out:
        n = len(warnings)
        typer.echo("all plugins ok" + (f" ({n} warning{'s' if n > 1 else ''})" if n else ""))
