"""Rebuild mecha_lora/data/*-modules.json.gz from the shared kohya module tables.

Run from the repository root: python plugins/mecha-lora/scripts/build_tables.py SHARED_DIR
(SHARED_DIR holds sd1-kohya-lora.json and sdxl-kohya-lora.json). Only the fields the loader needs
are kept: module name without the ``lora_`` prefix, its other kohya spelling, its PEFT/diffusers
module path, the checkpoint key, the module's weight shape, and the rows of a fused key.
"""

import gzip
import json
import os
import sys

TABLES = {"sd1-ldm": "sd1-kohya-lora.json", "sdxl-sgm": "sdxl-kohya-lora.json"}


def compact(path: str) -> list[list]:
    with open(path) as f:
        modules = json.load(f)["modules"]
    rows = []
    for name, m in modules.items():
        alt = m.get("kohya_but_diffusers_name")
        rows.append([
            name.removeprefix("lora_"),
            alt.removeprefix("lora_") if alt else None,
            m["peft_module"],
            m["ldm_key"],
            m["shape"],
            m.get("ldm_rows"),
            m.get("ldm_shape"),
        ])
    return rows


def main(shared: str) -> None:
    out_dir = os.path.join(os.path.dirname(__file__), "..", "mecha_lora", "data")
    for arch, name in TABLES.items():
        rows = compact(os.path.join(shared, name))
        target = os.path.join(out_dir, f"{arch}-modules.json.gz")
        # mtime=0 keeps the bytes reproducible
        with gzip.GzipFile(target, "wb", mtime=0) as f:
            f.write(json.dumps({"arch": arch, "source": name, "modules": rows}, separators=(",", ":")).encode())
        print(target, len(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/architectures")
