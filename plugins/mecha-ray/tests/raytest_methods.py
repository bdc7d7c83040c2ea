"""Merge methods for the mecha-ray tests, installed as a plugin the cluster's workers discover."""

from __future__ import annotations

import os
import signal

from mecha_core import hookimpl, merge_method


@merge_method(elementwise=True, formula="a + b")
def add_dying_once(a, b, *, marker: str = ""):
    """a + b; the first call anywhere (no file at ``marker`` yet) kills its own process first."""
    if marker and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return a + b


@merge_method(elementwise=True, formula="a + b, failing on 7-element keys")
def add_failing_on_seven(a, b):
    """a + b, but raises for a key of 7 elements (a failure no retry can mend)."""
    if a.numel() == 7:
        raise ValueError("seven elements are refused")
    return a + b


@hookimpl
def mecha_merge_methods() -> list:
    return [add_dying_once, add_failing_on_seven]
