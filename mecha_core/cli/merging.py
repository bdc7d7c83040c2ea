"""``mecha merge``, ``mecha compose`` and ``mecha recipe show``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MechaError, OutputError, RecipeError
from .common import print_json


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
    recipe: Annotated[Path, typer.Argument(help="The .mecha recipe to run (mecha or sd-mecha format).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the merged .safetensors.")],
    models_dir: Annotated[Optional[Path], typer.Option("--models-dir", "-m",
                          help="Folder where relative model paths are looked up first.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("-p", "--param", metavar="NAME=VALUE",
                     help="Fill a recipe parameter with a number, a model file or a .mecha recipe.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Worker threads (default: CPU cores).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Bytes of tensors in flight, e.g. 2G (default 1G).")] = None,
    work_dtype: Annotated[str, typer.Option(help="Dtype methods compute in.")] = "float32",
    output_dtype: Annotated[Optional[str], typer.Option(help="Dtype of the output (default: the first input's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda when present.")] = "cpu",
    allow_missing: Annotated[bool, typer.Option("--allow-missing",
                             help="Keys missing from some inputs take the first input that has them.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Write NaN/Inf values instead of failing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Run a recipe and write the merged model."""
    from .. import api, compose, load_recipe

    node = load_recipe(recipe)
    if param:
        fills = {}
        for item in param:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise MechaError(f"-p expects NAME=VALUE, got '{item}'")
            if name.strip() in fills:  # the last one winning silently would hide a typo
                raise MechaError(f"-p {name.strip()} is given twice")
            fills[name.strip()] = _fill_value(value, name.strip())
        node = compose(node, fills)
    if output.exists() and recipe.exists() and os.path.samefile(output, recipe):
        raise OutputError(f"{output}: the output would overwrite the recipe {recipe}; choose another path")
    progress = not quiet and not json_out and sys.stderr.isatty()
    path = api.merge(node, output, threads=threads, memory_budget=_parse_size(memory_budget) if memory_budget else None,
                     work_dtype=work_dtype, output_dtype=output_dtype, device=device,
                     allow_missing=allow_missing, allow_nonfinite=allow_nonfinite,
                     models_dir=models_dir, progress=progress)
    if json_out:
        print_json({"output": path, "bytes": os.path.getsize(path)})
    elif not quiet:
        typer.echo(f"wrote {path}")


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    """``-p NAME PATH`` pairs from the arguments typer left over."""
    fills: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        if args[i] not in ("-p", "--param"):
            raise MechaError(f"unexpected argument '{args[i]}'; fill parameters with -p NAME PATH")
        if i + 2 >= len(args) or args[i + 1].startswith("-") or args[i + 2] in ("-p", "--param"):
            raise MechaError("-p expects two values: -p NAME PATH (PATH: a .mecha recipe or a model file)")
        name, value = args[i + 1], args[i + 2]
        if any(name == n for n, _ in fills):
            raise MechaError(f"-p {name} is given twice")
        fills.append((name, value))
        i += 3
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
    template: Annotated[Path, typer.Argument(help="A .mecha recipe with parameters.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the composed .mecha recipe.")],
) -> None:
    """Fill a template's parameters with recipes or models and write the composed recipe.

    Fill each parameter with -p NAME PATH (repeatable), where PATH is a .mecha recipe or a
    model file (or, for a parameter used as a hyperparameter, a number). Model paths found
    relative to a recipe or the current folder are rewritten relative to the output's folder,
    so the composed recipe runs from anywhere. Without -p, the recipe is only rewritten: this
    turns an sd-mecha recipe into mecha's format.
    """
    import tempfile

    from ..engine.run import output_mode, resolve_output, temp_prefix
    from .. import compose, get_host, load_recipe
    from ..recipe import as_fill, dump_recipe
    from ..recipe.nodes import relocate

    if os.path.exists(output) and os.path.samefile(output, template):
        raise MechaError(f"{output}: the composed recipe would overwrite its template; choose another -o")
    pairs = _pairs(list(ctx.args))
    if os.path.exists(output):
        for name, value in pairs:
            if os.path.exists(value) and os.path.samefile(output, value):
                raise MechaError(f"{output}: the composed recipe would overwrite -p {name}'s file; choose another -o")
        if _is_safetensors(output):  # recipe text over a model would destroy the model
            raise MechaError(f"{output}: is a safetensors model; a composed recipe goes to a .mecha file")
    node = load_recipe(template)
    fills = {name: as_fill(value if os.path.exists(value) else _fill_value(value, name), base_dir=os.getcwd(),
                           host=get_host())
             for name, value in pairs}
    composed = relocate(compose(node, fills), os.path.dirname(os.path.abspath(output)))
    text = dump_recipe(composed)
    target = resolve_output(output)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=os.path.dirname(target))
        with open(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, output_mode(target))
        os.replace(tmp, target)
    except OSError as exc:
        raise MechaError(f"{output}: cannot write: {exc.strerror or exc}") from None
    finally:  # also on Ctrl-C: never leave the temporary file behind
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    typer.echo(f"wrote {output}")


def recipe_show_command(
    file: Annotated[Path, typer.Argument(help="A merged .safetensors file.")],
) -> None:
    """Print the recipe stored in a merged file's metadata."""
    from ..engine.safetensors_io import read_header

    _, metadata = read_header(file)
    text = (metadata or {}).get("mecha_recipe")
    if text is None:
        raise RecipeError(f"{file}: holds no mecha recipe (it was not written by mecha)")
    sys.stdout.write(text)
