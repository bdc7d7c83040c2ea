"""Entry point of the mecha-methods plugin: only hook implementations live here."""

from mecha_core import hookimpl

from .basic import BASIC

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_merge_methods():
    return list(BASIC)
