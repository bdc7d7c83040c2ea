"""The typer app: ``mecha merge | compose | info | inspect | methods | plugins | recipe``."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from .common import boundary, debug_enabled
from . import describe, merging

app = typer.Typer(
    name="mecha", no_args_is_help=True, add_completion=False,
    help="Merge model checkpoints from readable recipes, in bounded memory.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
plugins_app = typer.Typer(no_args_is_help=True, help="The installed plugins.")
recipe_app = typer.Typer(no_args_is_help=True, help="Recipes stored in merged files.")
app.add_typer(plugins_app, name="plugins")
app.add_typer(recipe_app, name="recipe")


def _version(value: bool) -> None:
    if value:
        from ..api import _version as v

        typer.echo(f"mecha {v()}")
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


app.command("merge")(boundary(merging.merge_command))
app.command("compose", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    boundary(merging.compose_command))
app.command("methods")(boundary(describe.methods_command))
app.command("info")(boundary(describe.info_command))
app.command("inspect")(boundary(describe.inspect_command))
plugins_app.command("list")(boundary(describe.plugins_list_command))
plugins_app.command("check")(boundary(describe.plugins_check_command))
recipe_app.command("show")(boundary(merging.recipe_show_command))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        raise SystemExit(130)
