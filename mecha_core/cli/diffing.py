"""``mecha diff``: how models differ, block by block (table, --json, --plot)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import escaped, print_json


def diff_command(
    models: Annotated[list[str], typer.Argument(metavar="MODEL", show_default=False,
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


#: ``--report`` file types: a plot, or the diff's JSON
REPORT_JSON = ".json"


def check_report(report: Path | None) -> None:
    """Refuse a ``--report`` file mecha cannot write, before the merge starts (exit 2)."""
    if report is None or os.path.splitext(report)[1].lower() == REPORT_JSON:
        return
    from ..difference.plot import PLOT_FORMATS, require_matplotlib
    from ..errors import MechaError

    if os.path.splitext(report)[1].lower() not in PLOT_FORMATS:
        raise MechaError(f"--report {report}: a report is written as {', '.join(PLOT_FORMATS)} (a plot) or "
                         f"{REPORT_JSON} (the numbers); end the file name with one of them")
    require_matplotlib("--report")


def write_report(recipe, output: str, report: Path, models_dir: Path | None, threads: int | None,
                 progress: bool, protect: dict) -> str:
    """After a merge: diff each weight input against the written output, into ``report``."""
    import json

    from ..difference import merge_report
    from ..errors import MechaError, mark_failed
    from ..output import write_text_atomically

    try:
        result = merge_report(recipe, output, models_dir=models_dir, threads=threads, progress=progress)
        guarded = {**protect, output: f"the merged output {output}"}
        if os.path.splitext(report)[1].lower() == REPORT_JSON:
            return write_text_atomically(report, json.dumps(result.as_json(), indent=2) + "\n",
                                         protect=guarded, what="report")
        from ..difference.plot import write_plot

        write_plot(result, report, protect=guarded)
        return os.path.abspath(report)
    except MechaError as exc:  # the merge itself succeeded and stays; the report failed
        raise mark_failed(MechaError(f"the merge was written to {output}, but its report failed: {exc}")) from exc
