"""The typer app: ``mecha merge | compose | diff | info | inspect | methods | plugins | recipe``, plus the
commands plugins add through the ``mecha_cli_commands`` hook (``mecha lora ...``).

Plugin commands are looked up only when a name is not a core command, or when the help lists
every command: ``mecha merge ...`` never waits for them.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
import typer.core
import typer.main

from ..errors import EXIT_INTERRUPTED, MechaError, PluginCodeError, PluginError
from . import describe, diffing, merging
from .common import boundary, debug_enabled, fail, json_error


def _plugin_cli_commands() -> dict[str, tuple[str | None, Any]]:
    """``name -> (plugin, CliCommand)`` of every plugin command nobody else claims. Under
    MECHA_STRICT_PLUGINS=1 a broken plugin must not take the core commands' help down with it."""
    from ..plugins import get_host

    try:
        host = get_host()
    except PluginError:
        return {}
    registry = host.cli_commands
    return {name: (registry.provider(name), registry.get(name)) for name in registry.names()
            if name not in registry.duplicates()}


def _mounted(plugin: str | None, spec: Any) -> Any:
    """The plugin's typer app as a click command named ``spec.name``, whose failures are one line
    naming the plugin (a MechaError: its message; anything else: a PluginCodeError)."""
    command = typer.main.get_command(spec.app)
    command.name = spec.name
    if spec.help:
        command.help = command.short_help = spec.help
    invoke = command.invoke

    def guarded(ctx: Any) -> Any:
        try:
            return invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except MechaError as exc:
            error: MechaError = exc
        except Exception as exc:
            if type(exc).__module__.startswith(("typer.", "click.")):  # usage errors: typer prints them
                raise
            from ..plugins import describe_exception

            error = PluginCodeError(f"plugin '{plugin}': command 'mecha {spec.name}' raised "
                                    f"{describe_exception(exc)}", plugin=plugin)
            error.__cause__ = exc
        fail(error)

    command.invoke = guarded
    return command


class MechaGroup(typer.core.TyperGroup):
    """The root group: core commands, then the commands plugins provide."""

    def list_commands(self, ctx: Any) -> list[str]:
        core = list(super().list_commands(ctx))
        return core + sorted(n for n in _plugin_cli_commands() if n not in core)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        plugin_command = _plugin_cli_commands().get(cmd_name)
        return _mounted(*plugin_command) if plugin_command else None


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
    name="mecha", cls=MechaGroup, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False, epilog=EXIT_CODES,
    help="Merge model checkpoints from readable recipes, in bounded memory.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
plugins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The installed plugins.")
recipe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Recipes stored in merged files, or written in another format.")
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
app.command("diff")(boundary(diffing.diff_command))
app.command("methods")(boundary(describe.methods_command))
app.command("info")(boundary(describe.info_command))
app.command("inspect")(boundary(describe.inspect_command))
plugins_app.command("list")(boundary(describe.plugins_list_command))
plugins_app.command("check")(boundary(describe.plugins_check_command))
recipe_app.command("show")(boundary(merging.recipe_show_command))
recipe_app.command("import")(boundary(merging.recipe_import_command))


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
    """Run the command line and exit with its code (for callers of ``mecha_core.cli.main``; the
    ``mecha`` script is :func:`mecha_core.__main__.main`, which also covers Ctrl-C while importing)."""
    raise SystemExit(run())

