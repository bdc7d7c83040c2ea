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

#: LyCORIS's "full" preset targets conv_in, conv_out and time_embedding by their diffusers names.
#: kohya's own SDXL U-Net has no such names, so the shared SDXL table lists none; trainers that
#: use a diffusers SDXL U-Net do write them (and add_embedding, SDXL's label_emb). Rows as in
#: compact(): kohya (ldm-style) name, diffusers spelling, PEFT path, checkpoint key, shape.
EXTRA = {"sdxl-sgm": [
    ["unet_input_blocks_0_0", "unet_conv_in", "unet.conv_in",
     "model.diffusion_model.input_blocks.0.0.weight", [320, 4, 3, 3], None, None],
    ["unet_out_2", "unet_conv_out", "unet.conv_out", "model.diffusion_model.out.2.weight", [4, 320, 3, 3], None, None],
    ["unet_time_embed_0", "unet_time_embedding_linear_1", "unet.time_embedding.linear_1",
     "model.diffusion_model.time_embed.0.weight", [1280, 320], None, None],
    ["unet_time_embed_2", "unet_time_embedding_linear_2", "unet.time_embedding.linear_2",
     "model.diffusion_model.time_embed.2.weight", [1280, 1280], None, None],
    ["unet_label_emb_0_0", "unet_add_embedding_linear_1", "unet.add_embedding.linear_1",
     "model.diffusion_model.label_emb.0.0.weight", [1280, 2816], None, None],
    ["unet_label_emb_0_2", "unet_add_embedding_linear_2", "unet.add_embedding.linear_2",
     "model.diffusion_model.label_emb.0.2.weight", [1280, 1280], None, None],
]}


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
        rows = compact(os.path.join(shared, name)) + EXTRA.get(arch, [])
        target = os.path.join(out_dir, f"{arch}-modules.json.gz")
        # mtime=0 keeps the bytes reproducible
        with gzip.GzipFile(target, "wb", mtime=0) as f:
            f.write(json.dumps({"arch": arch, "source": name, "modules": rows}, separators=(",", ":")).encode())
        print(target, len(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/architectures")
