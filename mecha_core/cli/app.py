"""The typer app: ``mecha merge | compose | info | inspect | methods | plugins | recipe``."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import EXIT_INTERRUPTED
from . import describe, merging
from .common import boundary, debug_enabled, json_error

EXIT_CODES = """\b
Exit codes:
  0    success
  1    the merge failed after it started reading tensors (a NaN found,
       a method failed, the disk filled, an input changed mid-merge)
  2    bad usage, options, recipe or input, found before any tensor is read
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
With --json, a failure also prints {"error", "kind", "file", "line"} on stdout."""

# plain help (rich_markup_mode=None): no boxes, no <bool> metavars on flags, and no rich import
app = typer.Typer(
    name="mecha", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False, epilog=EXIT_CODES,
    help="Merge model checkpoints from readable recipes, in bounded memory.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
plugins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The installed plugins.")
recipe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Recipes stored in merged files.")
app.add_typer(plugins_app, name="plugins")
app.add_typer(recipe_app, name="recipe")


def _version(value: bool) -> None:
    if value:
        from ..about import version

        typer.echo(f"mecha {version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """mecha merges checkpoints (SD1, SDXL, SD3, LLMs, any safetensors) from .mecha recipes."""
    if debug:
        os.environ["MECHA_DEBUG"] = "1"


app.command("merge", epilog=EXIT_CODES)(boundary(merging.merge_command))
app.command("compose", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    boundary(merging.compose_command))
app.command("methods")(boundary(describe.methods_command))
app.command("info")(boundary(describe.info_command))
app.command("inspect")(boundary(describe.inspect_command))
plugins_app.command("list")(boundary(describe.plugins_list_command))
plugins_app.command("check")(boundary(describe.plugins_check_command))
recipe_app.command("show")(boundary(merging.recipe_show_command))


def run(args: list[str] | None = None) -> int:
    """Run the command line on ``args`` (default: ``sys.argv[1:]``); returns the exit code.

    Click's usage errors (an unknown option, a missing argument) exit 2 like every usage error,
    and print the JSON error object too when ``--json`` was given; Ctrl-C anywhere exits 130."""
    # click's exception base, which typer does not export (newer typer vendors click)
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    args = sys.argv[1:] if args is None else args
    try:
        result = typer.main.get_command(app).main(args, prog_name="mecha", standalone_mode=False)
    except click_exception as exc:
        if "--json" in args:
            json_error(exc.format_message(), "UsageError")
        exc.show()
        return exc.exit_code
    except typer.Abort:  # older typers turn Ctrl-C outside a command into Abort
        if debug_enabled():
            raise
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point (kept for callers of ``mecha_core.cli.main``)."""
    from ..__main__ import main as entry

    raise SystemExit(entry())

