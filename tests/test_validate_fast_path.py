"""The architecture key checks' fast path (mecha_core/validate.py): every builtin key takes it
(the point: ~24,000 keys are checked on every start-up), and what it does not accept still gets
the full checks, which accept the unusual valid spellings and name the bad ones."""

from __future__ import annotations

import enum

from mecha_core.plugins import get_host
from mecha_core.specs import Architecture, KeySpec
from mecha_core.validate import _key_errors, _plain_key, architecture_errors


class Dim(enum.IntEnum):
    """An int subclass: a valid dimension for the full checks, not an exact int."""

    TWO = 2


def tiny(spec: KeySpec) -> Architecture:
    return Architecture(name="tiny", keys={"w": spec}, blocks=("IN00",), classes=("proj",))


def test_every_builtin_key_takes_the_fast_path():
    host = get_host()
    checked = 0
    for arch in host.architectures.values():
        blocks, classes = set(arch.blocks), set(arch.classes)
        slow = [key for key, spec in arch.keys.items() if not _plain_key(key, spec, blocks, classes)]
        assert slow == [], (arch.name, slow[:3])
        checked += len(arch.keys)
    assert checked > 1000


def test_an_int_subclass_dimension_is_still_valid_through_the_full_checks():
    spec = KeySpec(shape=(Dim.TWO, 3), dtype="float16", component="body", blocks=("IN00",), klass="proj")
    assert not _plain_key("w", spec, {"IN00"}, {"proj"})
    assert _key_errors("architecture 'tiny'", "w", spec, {"IN00"}, {"proj"}) == []
    assert architecture_errors(tiny(spec)) == []


def test_what_the_fast_path_refuses_is_named_by_the_full_checks():
    bad = {
        "a bool dimension": (KeySpec(shape=(True,), dtype="float16", component="body"),
                             "architecture 'tiny': key 'w' has shape (True,); use a tuple of non-negative ints"),
        "an unlisted block": (KeySpec(shape=(2,), dtype="float16", component="body", blocks=("OUT05",)),
                              "architecture 'tiny': key 'w' is in blocks ['OUT05'] that the architecture "
                              "does not list"),
        "an unlisted class": (KeySpec(shape=(2,), dtype="float16", component="body", klass="mlp"),
                              "architecture 'tiny': key 'w' has class 'mlp' that the architecture does not list"),
        "an empty component": (KeySpec(shape=(2,), dtype="float16", component=""),
                               "architecture 'tiny': key 'w': component must be a non-empty str, got ''"),
    }
    for what, (spec, message) in bad.items():
        assert not _plain_key("w", spec, {"IN00"}, {"proj"}), what
        assert architecture_errors(tiny(spec)) == [message], what
