"""``mecha methods``, ``mecha info``, ``mecha inspect`` and ``mecha plugins``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import MechaError
from ..plugins import get_host
from .common import print_json


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
    name: Annotated[Optional[str], typer.Argument(help="Show one method in full.")] = None,
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


def architecture_summary(arch: Any, verbose: bool) -> dict[str, Any]:
    comps: dict[str, list[str]] = {}
    for key, spec in arch.keys.items():
        comps.setdefault(spec.component, []).append(key)
    out: dict[str, Any] = {
        "name": arch.name, "description": arch.description, "aliases": list(arch.aliases),
        "keys": len(arch.keys), "required_keys": len(arch.required_keys),
        "components": {c: len(k) for c, k in comps.items()},
        "blocks": list(arch.blocks), "classes": list(arch.classes),
    }
    if verbose:
        out["component_keys"] = comps
        blocks: dict[str, list[str]] = {b: [] for b in arch.blocks}
        classes: dict[str, list[str]] = {c: [] for c in arch.classes}
        for key, spec in arch.keys.items():
            for b in spec.blocks:
                blocks.setdefault(b, []).append(key)
            if spec.klass:
                classes.setdefault(spec.klass, []).append(key)
        out["block_keys"], out["class_keys"] = blocks, classes
    return out


def info_command(
    arch: Annotated[Optional[str], typer.Argument(help="An architecture to describe.")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List the keys of each component, block and class.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List architectures, or describe one: components, blocks and classes."""
    host = get_host()
    if arch is None:
        archs = host.architectures.values()
        if json_out:
            print_json([{"name": a.name, "description": a.description, "keys": len(a.keys),
                         "plugin": host.architectures.provider(a.name)} for a in archs])
        elif not archs:
            typer.echo("no architectures installed (any safetensors file still merges by key)")
        for a in archs if not json_out else []:
            typer.echo(f"{a.name:<16} {len(a.keys):>5} keys  {a.description}")
        return
    summary = architecture_summary(host.architecture(arch), verbose)
    if json_out:
        print_json(summary)
        return
    typer.echo(f"{summary['name']}: {summary['description']}")
    typer.echo(f"  keys: {summary['keys']} ({summary['required_keys']} required)")
    typer.echo("  components: " + ", ".join(f"{c} ({n})" for c, n in summary["components"].items()))
    typer.echo("  blocks: " + (", ".join(summary["blocks"]) or "none"))
    typer.echo("  classes: " + (", ".join(summary["classes"]) or "none"))
    if verbose:
        for title, table in (("component", summary["component_keys"]), ("block", summary["block_keys"]),
                             ("class", summary["class_keys"])):
            for name, keys in table.items():
                typer.echo(f"\n  {title} {name}:")
                for k in keys:
                    typer.echo(f"    {k}")


def inspect_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Detect a file's architecture and model type from its header; show missing/unexpected keys."""
    from ..engine.safetensors_io import SafetensorsFile
    from ..engine.sources import detect_architecture, detect_type

    host = get_host()
    f = SafetensorsFile(file)
    try:
        keys = frozenset(f.keys)
        type_ = detect_type(str(file), keys, host)
        arch = detect_architecture(str(file), keys, host) if type_ in ("base", "delta") else None
        dtypes: dict[str, int] = {}
        size = 0
        for k, info in f.keys.items():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            size += f.nbytes(k)
        result: dict[str, Any] = {
            "file": str(file), "architecture": arch.name if arch else None, "type": type_,
            "keys": len(keys), "dtypes": dtypes, "bytes": size, "has_recipe": "mecha_recipe" in f.metadata,
        }
        if arch is not None:
            aliases = {a: k for k, s in arch.keys.items() for a in s.aliases}
            present = {aliases.get(k, k) for k in keys}
            result["missing"] = sorted(arch.required_keys - present)
            result["unexpected"] = sorted(present - set(arch.keys))
    finally:
        f.close()
    if json_out:
        print_json(result)
        return
    typer.echo(f"{file}: {result['architecture'] or 'unknown architecture'}, type {type_}, "
               f"{len(keys)} keys, {size / 1e6:,.1f} MB")
    typer.echo("  dtypes: " + ", ".join(f"{d} ({n})" for d, n in sorted(dtypes.items())))
    for what in ("missing", "unexpected"):
        if result.get(what):
            typer.echo(f"  {what} keys ({len(result[what])}): " + ", ".join(result[what][:10]) +
                       (" ..." if len(result[what]) > 10 else ""))


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
        provides = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in r["provides"].items()) or "nothing"
        line = f"{r['name']:<10} {r['distribution'] or '-':<16} {r['version'] or '-':<10} {r['status']:<8} {provides}"
        typer.echo(line)
        if r["error"]:
            typer.echo(f"    error: {r['error']}")
        if verbose:
            typer.echo(f"    module: {r['module'] or '-'}")
            for kind, names in r["provides"].items():
                typer.echo(f"    {kind.replace('_', ' ')}: {', '.join(names)}")
    for warning in host.warnings:
        typer.echo(f"warning: {warning}", err=True)


def plugins_check_command() -> None:
    """Exit non-zero if any plugin failed to load or two plugins claim one name."""
    problems = _diagnostic_host().problems()
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    if problems:
        raise MechaError(f"{len(problems)} plugin problem(s); `mecha plugins list` shows every plugin")
    typer.echo("all plugins ok")
