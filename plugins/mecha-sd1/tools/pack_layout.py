"""Pack a layout JSON from ../shared/data/architectures into the compact file a plugin ships.

Usage (from the repository root):
    python plugins/mecha-sd1/tools/pack_layout.py LAYOUT.json [--blocks BLOCKS.json] OUT.json.gz

The packed file is gzip'd JSON (fixed mtime, so the same input gives the same bytes):
    {"name": ..., "source": ..., "blocks": [block names] | [],
     "keys": [[key, shape, dtype, component, optional (0/1), [aliases], block | null], ...]}
Keys keep the order of the layout file. Only the facts the plugins need are kept (no stats),
which makes loading at every command start cheap. The SDXL and SD3 plugins use this tool too.
"""

from __future__ import annotations

import argparse
import gzip
import json


def pack(layout_path: str, blocks_path: str | None) -> dict:
    with open(layout_path) as f:
        layout = json.load(f)
    block_names: list[str] = []
    key_to_block: dict[str, str] = {}
    if blocks_path:
        with open(blocks_path) as f:
            block_map = json.load(f)
        block_names, key_to_block = block_map["blocks"], block_map["key_to_block"]
        unknown = set(key_to_block) ^ set(layout["keys"])
        if unknown:
            raise SystemExit(f"block map and layout disagree on {len(unknown)} keys, e.g. {sorted(unknown)[:3]}")
    rows = []
    for key, spec in layout["keys"].items():
        rows.append([key, spec["shape"], spec["dtype"], spec["component"], int(bool(spec.get("optional"))),
                     spec.get("aliases", []), key_to_block.get(key)])
    return {"name": layout["name"], "source": layout.get("source_note", ""), "blocks": block_names, "keys": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout")
    parser.add_argument("out")
    parser.add_argument("--blocks")
    args = parser.parse_args()
    data = json.dumps(pack(args.layout, args.blocks), separators=(",", ":")).encode()
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(data)


if __name__ == "__main__":
    main()
