"""``mecha merge``, ``mecha compose`` and ``mecha recipe show``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MechaError, OutputError, RecipeError
from ..work_dtypes import WORK_DTYPES
from .common import escaped, print_json


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        size = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):  # OverflowError: "infG"
        size = 0
    if size < 1:  # 0 would silently mean the default, a negative size one unit at a time
        raise MechaError(f"--memory-budget: cannot read '{text}' as a positive size (e.g. 2G, 512M)")
    return size


def _fill_value(text: str, name: str):
    from ..recipe.nodes import LiteralNode

    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return LiteralNode(lowered == "true")
    for conv in (int, float):
        try:
            number = conv(text)
        except ValueError:
            continue
        if number != number:  # NaN: a recipe cannot hold it, and the error must name the -p
            raise MechaError(f"-p {name}: NaN is not a parameter value; give a number, a model file or a .mecha recipe")
        return LiteralNode(number)
    return text


def merge_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE",
                                           help="The .mecha recipe to run (mecha or sd-mecha format).")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="FILE",
                      help="Where to write the merged model: a .safetensors file, or a folder (a name "
                           "ending with /, or an existing folder) for Hugging Face shards.")],
    models_dir: Annotated[Optional[Path], typer.Option("--models-dir", "-m", metavar="FOLDER",
                          help="Folder where relative model paths are looked up first.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("-p", "--param", metavar="NAME=VALUE",
                     help="Fill a recipe parameter with a number, a model file or a .mecha recipe; "
                          "NAME=V1,V2,... sweeps it: one output per value, named by {NAME} in -o.")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="Worker threads (default: CPU cores).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(metavar="SIZE",
                             help="Bytes of tensors in flight, e.g. 2G (default 1G).")] = None,
    work_dtype: Annotated[str, typer.Option(metavar="DTYPE",
                          help=f"Dtype methods compute in: {', '.join(WORK_DTYPES['cpu'])}.")] = "float32",
    output_dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE",
                            help="Dtype of the output (default: the first input's).")] = None,
    fp8_scaled: Annotated[bool, typer.Option("--fp8-scaled",
                          help="With an fp8 --output-dtype: weight matrices as fp8 with a scale each "
                               "(ComfyUI's fp8_scaled), other keys in bfloat16.")] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu, or cuda when present.")] = "cpu",
    allow_missing: Annotated[bool, typer.Option("--allow-missing",
                             help="Keys missing from some inputs take the first input that has them.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite",
                                                  help="Write NaN/Inf values instead of failing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    shard_size: Annotated[Optional[str], typer.Option(
        "--shard-size", metavar="SIZE",
        help="Folder output: largest shard, e.g. 5GB, 500MB or bytes (default 50GB, as save_pretrained).")] = None,
    copy_files_from: Annotated[Optional[str], typer.Option(
        "--copy-files-from", metavar="MODEL",
        help="Folder output: the model (as the recipe names it) whose config and tokenizer files are "
             "copied (default: the first model in a folder).")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE",
                      help="After the merge, how far the result moved from each input, per block: a plot "
                           "(.png, .svg) or the numbers (.json); see mecha diff.")] = None,
    executor: Annotated[str, typer.Option(
        "--executor", metavar="NAME",
        help="What runs the merge: local (this machine), or one a plugin adds (ray, from mecha-ray).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", metavar="ADDR",
        help="--executor ray: the cluster to use (default: $RAY_ADDRESS, else a Ray started for the run).")] = None,
) -> None:
    """Run a recipe and write the merged model."""
    from .. import api, compose, load_recipe
    from ..output_folder import is_folder_output
    from .diffing import check_report, write_report

    check_report(report)

    folder = is_folder_output(output)
    if not folder and (shard_size is not None or copy_files_from is not None):
        raise OutputError(f"{output}: --shard-size and --copy-files-from are for folder outputs; end "
                          f"the output's name with / to write a folder")
    if not folder and not os.path.lexists(output):  # a new name: refused before the recipe is even read
        api.check_output_name(output)
    if ray_address is not None and executor != "ray":
        raise MechaError("--ray-address is for --executor ray")
    settings = {"address": ray_address} if ray_address is not None else {}
    node = load_recipe(recipe)
    protect = {recipe: f"the recipe {recipe}"}  # every file the merge reads; the engine adds the models
    fills, swept = {}, {}
    for item in param or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise MechaError(f"-p expects NAME=VALUE, got '{item}'")
        name = name.strip()
        if name in fills or name in swept:  # the last one winning silently would hide a typo
            raise MechaError(f"-p {name} is given twice")
        values = value.split(",") if "," in value and not _names_file(value) else [value]
        if any(not v.strip() for v in values):
            raise MechaError(f"-p {name}: an empty value in '{value}'; separate a sweep's values with commas")
        filled = [_fill_value(v, name) for v in values]
        for text, fill in zip(values, filled):
            if isinstance(fill, str) and _names_file(text):
                protect[text] = f"-p {name}'s file {text}"
        if len(values) > 1:
            swept[name] = filled
        else:
            fills[name] = filled[0]
    progress = not quiet and not json_out and sys.stderr.isatty()
    options = dict(threads=threads, memory_budget=_parse_size(memory_budget) if memory_budget else None,
                   work_dtype=work_dtype, output_dtype=output_dtype, device=device,
                   allow_missing=allow_missing, allow_nonfinite=allow_nonfinite,
                   models_dir=models_dir, progress=progress, protect=protect, executor=executor,
                   executor_settings=settings,
                   **({"shard_size": shard_size, "copy_files_from": copy_files_from} if folder else {}))
    if swept:
        from ..sweeps import sweep_outputs, sweep_points

        if report is not None:
            raise MechaError("--report compares one merge with its inputs; it cannot follow a sweep")
        if fp8_scaled:
            raise MechaError("--fp8-scaled writes one merge; it cannot follow a sweep")
        # every output name checked before the recipe's models are opened
        sweep_outputs(output, sweep_points(swept))
        if not folder:
            for name in sweep_outputs(output, sweep_points(swept)):
                if not os.path.lexists(name):
                    api.check_output_name(name)
        if fills:
            node = compose(node, fills)
        results = api.sweep(node, output, swept, **options)
        if json_out:
            print_json({"outputs": [{"output": path, "bytes": _size(path),
                                     "params": {k: _plain(v) for k, v in values.items()}}
                                    for values, path in results]})
        elif not quiet:
            for _, path in results:
                typer.echo(f"wrote {path}")
        return
    if fills:
        node = compose(node, fills)
    path = api.merge(node, output, fp8_scaled=fp8_scaled, **options)
    written = write_report(node, path, report, models_dir, threads, progress, protect) if report else None
    if json_out:
        print_json({"output": path, "bytes": _size(path), **({"report": written} if report else {})})
    elif not quiet:
        typer.echo(f"wrote {path}" + (f" and {written}" if report else ""))


def _size(path: str) -> int:
    """Bytes of an output file, or of the files of an output folder."""
    if os.path.isdir(path):
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    return os.path.getsize(path)


def _plain(value: object) -> object:
    """A swept value as JSON shows it (a number, a bool or a path)."""
    from ..recipe.nodes import LiteralNode

    return value.value if isinstance(value, LiteralNode) else value


def _names_file(value: str) -> bool:
    try:
        return os.path.lexists(value)
    except (OSError, ValueError):
        return False


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    """``-p NAME=VALUE`` (as ``mecha merge`` takes it) or ``-p NAME PATH`` fills, from the
    arguments typer left over. A parameter name never holds '=', so the forms cannot be confused."""
    fills: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        flag, attached = args[i], None
        for prefix in ("--param=", "-p="):
            if flag.startswith(prefix):
                flag, attached = flag[:len(prefix) - 1], flag[len(prefix):]
        if flag not in ("-p", "--param"):
            raise MechaError(f"unexpected argument '{args[i]}'; fill parameters with -p NAME=VALUE")
        item = attached if attached is not None else (args[i + 1] if i + 1 < len(args) else None)
        step = 1 if attached is not None else 2
        if item is not None and "=" in item:
            name, _, value = item.partition("=")
            if not name.strip():
                raise MechaError(f"-p expects NAME=VALUE, got '{item}'")
            name = name.strip()
        else:
            if item is None or item.startswith("-") or i + step >= len(args) or args[i + step] in ("-p", "--param"):
                raise MechaError("-p expects NAME=VALUE (or NAME PATH), where VALUE is a .mecha recipe, "
                                 "a model file or a number")
            name, value = item, args[i + step]
            step += 1
        if any(name == n for n, _ in fills):
            raise MechaError(f"-p {name} is given twice")
        fills.append((name, value))
        i += step
    return fills


def _is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a safetensors file (a header length, then '{')."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def compose_command(
    ctx: typer.Context,
    template: Annotated[Path, typer.Argument(metavar="TEMPLATE", help="A .mecha recipe with parameters.")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE",
                      help="Where to write the composed recipe (a .mecha file).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Fill a template's parameters with recipes or models and write the composed recipe.

    Fill each parameter with -p NAME=VALUE (repeatable, as for mecha merge), where VALUE is a
    .mecha recipe or a model file (or, for a parameter used as a hyperparameter, a number);
    -p NAME VALUE works too. Model paths found relative to a recipe or the current folder are
    rewritten relative to the output's folder, so the composed recipe runs from anywhere.
    Without -p, the recipe is only rewritten: this turns an sd-mecha recipe into mecha's format.
    """
    from .. import compose, get_host, load_recipe
    from ..api import recipe_files
    from ..output import OutputFile, write_text_atomically
    from ..recipe import as_fill, dump_recipe
    from ..recipe.nodes import relocate

    pairs = _pairs(list(ctx.args))
    # every file the composition reads; a model named by -p is not read, but a recipe text
    # written over it would destroy it all the same
    protect = {template: f"its template {template}"}
    protect.update({value: f"-p {name}'s file {value}" for name, value in pairs if _names_file(value)})
    out = OutputFile(output, protect=protect, what="composed recipe")
    if os.path.exists(out.target) and _is_safetensors(out.target):  # recipe text over a model
        raise MechaError(f"{output}: is a safetensors model; a composed recipe goes to a .mecha file")
    if os.path.splitext(output)[1].lower() != ".mecha":
        raise OutputError(f"{output}: compose writes a recipe; end the output's name with .mecha "
                          "(mecha merge writes .safetensors models)")
    node = load_recipe(template)
    fills = {name: as_fill(value if os.path.exists(value) else _fill_value(value, name), base_dir=os.getcwd(),
                           host=get_host())
             for name, value in pairs}
    composed = relocate(compose(node, fills), os.path.dirname(os.path.abspath(output)))
    text = dump_recipe(composed)
    # recipes composed into the -p recipes: known only now, from the nodes' locations
    protect.update({f: f"the recipe {f}" for f in recipe_files(composed) if f not in protect})
    target = write_text_atomically(output, text, protect=protect, what="composed recipe")
    if json_out:
        print_json({"output": target, "recipe": text})
    else:
        typer.echo(f"wrote {output}")


def recipe_import_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A recipe in any installed format "
                                         "(sd-mecha .mecha, mergekit .yml ...).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print {\"file\", \"recipe\"} as JSON on stdout.")] = False,
) -> None:
    """Print a recipe of another format (a recipe-format plugin reads it) as mecha's .mecha text.

    Model paths found relative to FILE are rewritten relative to the current folder, so the
    printed recipe runs from here (redirect it to a .mecha file)."""
    from .. import load_recipe
    from ..recipe import dump_recipe
    from ..recipe.nodes import relocate

    text = dump_recipe(relocate(load_recipe(str(file)), os.getcwd()))
    if json_out:
        print_json({"file": str(file), "recipe": text})
        return
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def recipe_show_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A merged .safetensors file or folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print {\"file\", \"recipe\", \"mecha_version\", "
                                           "\"mecha_plugins\"} as JSON on stdout.")] = False,
) -> None:
    """Print the recipe stored in a merged file's metadata."""

    from ..engine.folders import open_weights

    weights = open_weights(str(file))  # a merged folder: its first shard's metadata
    metadata = dict(weights.metadata)
    weights.close()
    text = (metadata or {}).get("mecha_recipe")
    if text is None:
        raise RecipeError(f"{file}: holds no mecha recipe (it was not written by mecha)")
    if json_out:
        from ..files import loads_bounded

        try:
            plugins = loads_bounded(metadata.get("mecha_plugins", "{}"))
        except ValueError:  # written by hand or damaged: show it as it is
            plugins = metadata.get("mecha_plugins")
        print_json({"file": str(file), "recipe": text, "mecha_version": metadata.get("mecha_version"),
                    "mecha_plugins": plugins})
        return
    # the text comes from the file, not from mecha: no control character reaches the terminal
    sys.stdout.write(escaped(text, keep_newlines=True))
