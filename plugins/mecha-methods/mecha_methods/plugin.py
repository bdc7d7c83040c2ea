"""Entry point of the mecha-methods plugin: only hook implementations live here."""

from mecha_core import hookimpl

from .averaging import AVERAGING
from .basic import BASIC
from .diffusion import DIFFUSION
from .keys import KEYS
from .sparse import SPARSE
from .spherical import SPHERICAL

MECHA_PLUGIN_API = 1

#: Every method of the plugin, in the order docs/methods.md lists them.
METHODS = [*BASIC, *SPHERICAL, *AVERAGING, *SPARSE, *DIFFUSION, *KEYS]


@hookimpl
def mecha_merge_methods():
    return list(METHODS)
