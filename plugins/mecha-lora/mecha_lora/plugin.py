"""Entry point of the mecha-lora plugin: only hook implementations live here."""

from mecha_core import hookimpl
from mecha_core.specs import CliCommand

from .convert import CONVERTERS, MODEL_TYPES
from .methods import METHODS

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_model_types():
    return list(MODEL_TYPES)


@hookimpl
def mecha_converters():
    return list(CONVERTERS)


@hookimpl
def mecha_merge_methods():
    return list(METHODS)


@hookimpl
def mecha_cli_commands():
    # typer is needed only here, not by merges through the Python API
    from .cli import HELP, app

    return [CliCommand("lora", app=app, help=HELP)]
