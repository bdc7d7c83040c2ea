"""``mecha diff``: how models differ, block by block (table, --json, --plot)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import escaped, print_json


def diff_command(
    models: Annotated[list[str], typer.Argument(metavar="MODEL...", show_default=False,
                      help="Two or more models to compare: model files, LoRAs, .mecha recipes "
                           "(computed on the fly, not written).")],
    base: Annotated[Optional[str], typer.Option("--base", metavar="BASE",
                    help="Also compare the task vectors MODEL - BASE (cosine, sign agreement).")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="One row per key instead of per block.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE",
                    help="Also draw a heat map and a bar chart per block (.png or .svg; needs "
                         "mecha-core[plot]).")] = None,
    models_dir: Annotated[Optional[Path], typer.Option("--models-dir", "-m", metavar="FOLDER",
                          help="Folder where relative model paths are looked up first.")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="Worker threads (default: CPU cores).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout "
                                           "(schema: docs/diff.md).")] = False,
) -> None:
    """Compare models block by block: cosine similarity, relative change ||B-A||/||A||, largest change.

    Every pair of models is compared, in order (A B C: A-B, A-C, B-C). Inputs are streamed like
    a merge (one pass, bounded memory)."""
    from ..difference import diff
    from ..errors import MechaError

    if plot is not None:  # refused before any input is opened
        from ..difference.plot import plot_format, require_matplotlib

        plot_format(plot)
        require_matplotlib()
    if len(models) < 2:
        raise MechaError("mecha diff needs at least two models to compare (mecha diff A B [C ...])")
    if models_dir is not None and not os.path.isdir(models_dir):
        raise MechaError(f"--models-dir {models_dir}: no such folder")
    progress = not quiet and not json_out and sys.stderr.isatty()
    result = diff(*models, base=base, keys=keys, threads=threads, models_dir=models_dir, progress=progress)
    if plot is not None:
        from ..difference.plot import write_plot

        write_plot(result, plot, protect={m: f"the input {m}" for m in [*models, *([base] if base else [])]})
    if json_out:
        print_json(result.as_json())
        return
    from ..difference.table import render

    sys.stdout.write(escaped(render(result), keep_newlines=True))
    if plot is not None:
        typer.echo(f"wrote {plot}")
