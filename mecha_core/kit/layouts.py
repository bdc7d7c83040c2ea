"""Packed layout tables: an architecture's key table shipped in a plugin as gzip'd JSON.

A layout JSON (one per architecture, e.g. ``sd1-ldm.json``: every key with its shape, dtype,
component, whether it is optional, and older spellings) and an optional MBW block map are packed
into one small file that a plugin ships in its package's ``data`` folder and reads at start-up.

Packed format (gzip'd JSON, written with a fixed mtime so the same input written to the same file
name gives the same bytes)::

    {"name": ..., "source": ..., "blocks": [block names] | [],
     "keys": [[key, shape, dtype, component, optional (0/1), [aliases], block | null], ...]}

Keys keep the order of the layout file. Only what an :class:`~mecha_core.specs.Architecture`
needs is kept (no statistics), so loading it on every command start is cheap.

Pack a layout with ``python -m mecha_core.kit.layouts LAYOUT.json [--blocks BLOCKS.json] OUT.json.gz``;
read it with :func:`load_packed` or build the architecture at once with :func:`packed_architecture`.
"""

from __future__ import annotations

import argparse
import gzip
import json
from importlib import resources
from typing import Any, Callable, Collection, Mapping

from ..collector import no_gc
from ..specs import Architecture, KeySpec

#: ``key -> class name or None``: the class (layer type) rule of an architecture.
LayerClass = Callable[[str], "str | None"]
#: ``key -> block name or None``: a block rule for layouts whose packed file carries no block map.
BlockOf = Callable[[str], "str | None"]


def pack_layout(layout: Mapping[str, Any], block_map: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The packed form of a layout (``{"name", "keys": {key: {shape, dtype, component, optional?,
    aliases?}}, "source_note"?}``) and an optional block map (``{"blocks": [...], "key_to_block":
    {key: block}}``, which must name exactly the layout's keys)."""
    block_names: list[str] = []
    key_to_block: Mapping[str, str] = {}
    if block_map is not None:
        block_names, key_to_block = list(block_map["blocks"]), block_map["key_to_block"]
        disagree = set(key_to_block) ^ set(layout["keys"])
        if disagree:
            raise ValueError(f"block map and layout disagree on {len(disagree)} keys, e.g. {sorted(disagree)[:3]}")
    rows = [[key, spec["shape"], spec["dtype"], spec["component"], int(bool(spec.get("optional"))),
             spec.get("aliases", []), key_to_block.get(key)]
            for key, spec in layout["keys"].items()]
    return {"name": layout["name"], "source": layout.get("source_note", ""), "blocks": block_names, "keys": rows}


def write_packed(packed: Mapping[str, Any], path: str) -> None:
    """Write a packed layout as gzip'd compact JSON. The gzip header holds no time (mtime 0), only
    the file's name, so the same table written to the same name always gives the same bytes."""
    data = json.dumps(packed, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(data)


def load_packed(package: str, filename: str) -> dict[str, Any]:
    """Read a packed layout from the ``data`` folder of an installed package (``mecha_sd1``)."""
    with resources.files(package).joinpath("data", filename).open("rb") as raw, gzip.open(raw) as f:
        return json.loads(f.read())


def packed_keys(packed: Mapping[str, Any], *, layer_class: LayerClass | None = None,
                block: BlockOf | None = None, optional_components: Collection[str] = ()) -> dict[str, KeySpec]:
    """The key table of a packed layout, in file order.

    ``layer_class`` gives each key's class (none when omitted); ``block`` replaces the packed
    block map with a rule; keys of ``optional_components`` are optional whatever the file says.
    """
    with no_gc():
        keys = {}
        for key, shape, dtype, component, optional, aliases, packed_block in packed["keys"]:
            found = block(key) if block is not None else packed_block
            keys[key] = KeySpec(tuple(shape), dtype, component, bool(optional) or component in optional_components,
                                tuple(aliases), (found,) if found else (),
                                layer_class(key) if layer_class is not None else None)
    return keys


def packed_architecture(package: str, filename: str, *, name: str, description: str = "",
                        layer_class: LayerClass | None = None, block: BlockOf | None = None,
                        blocks: tuple[str, ...] | None = None, optional_components: Collection[str] = (),
                        aliases: tuple[str, ...] = (), component_aliases: Mapping[str, str] | None = None
                        ) -> Architecture:
    """An Architecture from a packed layout shipped in ``package``'s ``data`` folder.

    Each key is in at most one block: the packed block map's, or ``block(key)`` when given.
    ``blocks`` (the block names, in order) defaults to the packed file's list; the class list is
    every class ``layer_class`` gives, sorted. See :func:`packed_keys` for the other options.
    """
    with no_gc():
        packed = load_packed(package, filename)
    keys = packed_keys(packed, layer_class=layer_class, block=block, optional_components=optional_components)
    classes = tuple(sorted({s.klass for s in keys.values() if s.klass}))
    return Architecture(name=name, keys=keys, blocks=tuple(packed["blocks"]) if blocks is None else tuple(blocks),
                        classes=classes, description=description, aliases=aliases,
                        component_aliases=dict(component_aliases or {}))


def main(argv: list[str] | None = None) -> int:
    """``python -m mecha_core.kit.layouts LAYOUT.json [--blocks BLOCKS.json] OUT.json.gz``"""
    parser = argparse.ArgumentParser(prog="python -m mecha_core.kit.layouts",
                                     description="Pack a layout JSON into the compact file a plugin ships.")
    parser.add_argument("layout", help="layout JSON: {name, keys: {key: {shape, dtype, component, ...}}}")
    parser.add_argument("out", help="the packed file to write (.json.gz)")
    parser.add_argument("--blocks", help="MBW block map JSON: {blocks: [...], key_to_block: {key: block}}")
    args = parser.parse_args(argv)
    with open(args.layout, encoding="utf-8") as f:
        layout = json.load(f)
    block_map = None
    if args.blocks:
        with open(args.blocks, encoding="utf-8") as f:
            block_map = json.load(f)
    try:
        packed = pack_layout(layout, block_map)
    except ValueError as exc:
        parser.exit(1, f"error: {args.blocks}: {exc}\n")
    write_packed(packed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
