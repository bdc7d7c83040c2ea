"""mecha_core.kit, the public plugin kit: packed layouts (pack, write, the command, load, build),
diffusers names, U-Net-only layouts, the safetensors re-exports, synthetic checkpoints, and lazy
exports. Expected values are written out by hand here, not computed by the kit."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mecha_core import kit
from mecha_core.errors import MechaError
from mecha_core.kit import diffusers, layouts, synthetic, unet_only
from mecha_core.specs import Architecture, ConvertedKey, KeySpec, TensorInfo

LAYOUT = {
    "name": "toy", "source_note": "hand-written",
    "keys": {
        "enc.layers.0.fc.weight": {"shape": [4, 2], "dtype": "float16", "component": "enc"},
        "enc.layers.0.fc.bias": {"shape": [4], "dtype": "float16", "component": "enc", "aliases": ["enc.fc0.b"]},
        "dec.out.weight": {"shape": [2, 4], "dtype": "float32", "component": "dec"},
        "dec.steps": {"shape": [], "dtype": "int64", "component": "dec", "optional": True},
    },
}
BLOCK_MAP = {"blocks": ["IN", "OUT"], "key_to_block": {"enc.layers.0.fc.weight": "IN", "enc.layers.0.fc.bias": "IN",
                                                         "dec.out.weight": "OUT", "dec.steps": None}}
PACKED_ROWS = [
    ["enc.layers.0.fc.weight", [4, 2], "float16", "enc", 0, [], "IN"],
    ["enc.layers.0.fc.bias", [4], "float16", "enc", 0, ["enc.fc0.b"], "IN"],
    ["dec.out.weight", [2, 4], "float32", "dec", 0, [], "OUT"],
    ["dec.steps", [], "int64", "dec", 1, [], None],
]


# -- packed layouts -----------------------------------------------------------------------------
def test_pack_layout_keeps_the_key_order_and_every_fact_an_architecture_needs():
    assert layouts.pack_layout(LAYOUT, BLOCK_MAP) == {"name": "toy", "source": "hand-written",
                                                      "blocks": ["IN", "OUT"], "keys": PACKED_ROWS}
    no_blocks = layouts.pack_layout(LAYOUT)
    assert no_blocks["blocks"] == [] and [row[6] for row in no_blocks["keys"]] == [None] * 4


def test_a_block_map_that_names_other_keys_is_refused():
    wrong = {"blocks": ["IN"], "key_to_block": {"enc.layers.0.fc.weight": "IN", "nowhere": "IN"}}
    with pytest.raises(ValueError, match="disagree on 4 keys"):
        layouts.pack_layout(LAYOUT, wrong)


def test_the_packed_file_is_gzip_json_with_the_same_bytes_every_time(tmp_path):
    packed = layouts.pack_layout(LAYOUT, BLOCK_MAP)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    layouts.write_packed(packed, str(tmp_path / "a" / "toy.json.gz"))
    layouts.write_packed(packed, str(tmp_path / "b" / "toy.json.gz"))
    raw = (tmp_path / "a" / "toy.json.gz").read_bytes()
    assert raw == (tmp_path / "b" / "toy.json.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime field: 0, so the bytes do not depend on the time
    assert json.loads(gzip.decompress(raw)) == packed


@pytest.mark.parametrize(("package", "filename"), [
    ("mecha_sd1", "sd1-ldm.json.gz"), ("mecha_sdxl", "sdxl-sgm.json.gz"), ("mecha_sdxl", "sdxl-kohya.json.gz"),
    ("mecha_sd3", "sd3-comfyui.json.gz")])
def test_the_builtins_data_files_are_what_write_packed_writes(tmp_path, package, filename):
    # the kit reads and writes the exact format the builtins ship: a round trip gives their bytes
    from importlib import resources

    shipped = resources.files(package).joinpath("data", filename).read_bytes()
    layouts.write_packed(layouts.load_packed(package, filename), str(tmp_path / filename))
    assert (tmp_path / filename).read_bytes() == shipped


def test_the_pack_command_writes_what_write_packed_writes(tmp_path):
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT), encoding="utf-8")
    (tmp_path / "blocks.json").write_text(json.dumps(BLOCK_MAP), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mecha_core.kit.layouts", str(tmp_path / "layout.json"),
                           "--blocks", str(tmp_path / "blocks.json"), str(tmp_path / "out.json.gz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(gzip.decompress((tmp_path / "out.json.gz").read_bytes())) == {
        "name": "toy", "source": "hand-written", "blocks": ["IN", "OUT"], "keys": PACKED_ROWS}
    # a block map of other keys: one line naming the file, nothing written
    (tmp_path / "bad.json").write_text(json.dumps({"blocks": [], "key_to_block": {}}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mecha_core.kit.layouts", str(tmp_path / "layout.json"),
                           "--blocks", str(tmp_path / "bad.json"), str(tmp_path / "never.json.gz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'bad.json'}: block map and layout disagree " \
                                                    f"on 4 keys, e.g. {sorted(LAYOUT['keys'])[:3]}"
    assert not (tmp_path / "never.json.gz").exists()


@pytest.fixture
def packed_package(tmp_path, monkeypatch):
    """An importable package ``kit_toy_pkg`` shipping ``data/toy.json.gz``."""
    package = tmp_path / "kit_toy_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    layouts.write_packed(layouts.pack_layout(LAYOUT, BLOCK_MAP), str(package / "data" / "toy.json.gz"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kit_toy_pkg", raising=False)
    return "kit_toy_pkg"


def _klass(key: str) -> str | None:
    return {"enc.layers.0.fc.weight": "fc", "enc.layers.0.fc.bias": "fc", "dec.out.weight": "out"}.get(key)


def test_packed_architecture_from_a_packages_data_folder(packed_package):
    assert layouts.load_packed(packed_package, "toy.json.gz")["keys"] == PACKED_ROWS
    arch = layouts.packed_architecture(packed_package, "toy.json.gz", name="toy-ldm", layer_class=_klass,
                                       description="a toy", aliases=("toy",), component_aliases={"e": "enc"})
    assert arch == Architecture(
        name="toy-ldm",
        keys={"enc.layers.0.fc.weight": KeySpec((4, 2), "float16", "enc", False, (), ("IN",), "fc"),
              "enc.layers.0.fc.bias": KeySpec((4,), "float16", "enc", False, ("enc.fc0.b",), ("IN",), "fc"),
              "dec.out.weight": KeySpec((2, 4), "float32", "dec", False, (), ("OUT",), "out"),
              "dec.steps": KeySpec((), "int64", "dec", True, (), (), None)},
        blocks=("IN", "OUT"), classes=("fc", "out"), description="a toy", aliases=("toy",),
        component_aliases={"e": "enc"})
    assert list(arch.keys) == [row[0] for row in PACKED_ROWS]


def test_packed_architecture_with_a_block_rule_and_optional_components(packed_package):
    arch = layouts.packed_architecture(packed_package, "toy.json.gz", name="toy-ldm",
                                       block=lambda key: key.split(".")[0].upper(), blocks=("ENC", "DEC"),
                                       optional_components=("enc",))
    assert arch.blocks == ("ENC", "DEC") and arch.classes == ()
    assert [(s.blocks, s.optional, s.klass) for s in arch.keys.values()] == [
        (("ENC",), True, None), (("ENC",), True, None), (("DEC",), False, None), (("DEC",), True, None)]


def test_no_gc_pauses_the_collector_and_restores_it():
    import gc

    assert gc.isenabled()
    with layouts.no_gc():
        assert not gc.isenabled()
        with layouts.no_gc():  # nested: the inner block must not turn it back on
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


# -- diffusers names ---------------------------------------------------------------------------
@pytest.mark.parametrize(("ldm", "expected"), [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
    ("input_blocks.2.1.proj_in.weight", "down_blocks.0.attentions.1.proj_in.weight"),
    ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
    ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("middle_block.0.emb_layers.1.weight", "mid_block.resnets.0.time_emb_proj.weight"),
    ("middle_block.1.transformer_blocks.0.attn1.to_k.weight",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"),
    ("middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("output_blocks.5.0.out_layers.0.weight", "up_blocks.1.resnets.2.norm2.weight"),
    ("output_blocks.4.1.norm.bias", "up_blocks.1.attentions.1.norm.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.2.bias", "conv_out.bias"),
])
def test_unet_names(ldm, expected):
    assert diffusers.unet_name(ldm) == expected


@pytest.mark.parametrize(("ldm", "expected"), [
    ("quant_conv.weight", "quant_conv.weight"),
    ("encoder.conv_in.bias", "encoder.conv_in.bias"),
    ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
    ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("encoder.down.2.downsample.conv.weight", "encoder.down_blocks.2.downsamplers.0.conv.weight"),
    ("decoder.up.3.block.2.conv1.weight", "decoder.up_blocks.0.resnets.2.conv1.weight"),
    ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.2.upsamplers.0.conv.bias"),
    ("decoder.mid.block_2.norm1.weight", "decoder.mid_block.resnets.1.norm1.weight"),
    ("encoder.mid.attn_1.proj_out.weight", "encoder.mid_block.attentions.0.to_out.0.weight"),
    ("decoder.mid.attn_1.norm.bias", "decoder.mid_block.attentions.0.group_norm.bias"),
])
def test_vae_names(ldm, expected):
    assert diffusers.vae_name(ldm) == expected


def test_names_the_models_do_not_have_are_key_errors():
    for convert, name in ((diffusers.unet_name, "nowhere.weight"), (diffusers.vae_name, "decoder.mid.nothing.w"),
                          (diffusers.unet_name, "input_blocks.1.0.strange.weight")):
        with pytest.raises(KeyError):
            convert(name)


def test_is_vae_linear_names_only_the_mid_attention_projection_weights():
    for name in ("encoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.attentions.0.to_v.weight",
                 "decoder.mid_block.attentions.0.to_out.0.weight"):
        assert diffusers.is_vae_linear(name)
    for name in ("decoder.mid_block.attentions.0.to_q.bias", "decoder.mid_block.attentions.0.group_norm.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "decoder.conv_in.weight"):
        assert not diffusers.is_vae_linear(name)


def test_text_encoder_aliases():
    assert diffusers.text_encoder_aliases("text_encoder.text_model.final_layer_norm.bias", "text_encoder.", "te.") == (
        "te.text_model.final_layer_norm.bias", "text_encoder.final_layer_norm.bias")
    assert diffusers.text_encoder_aliases("text_encoder_2.text_projection.weight", "text_encoder_2.", None) == ()
    assert diffusers.text_encoder_aliases("unet.conv_in.weight", "text_encoder.", "te.") == ()


# -- a U-Net saved alone -------------------------------------------------------------------------
FULL = Architecture("toy-diffusers", {
    "unet.conv_in.weight": KeySpec((4, 4), "float16", "diffuser", aliases=("unet.old_conv_in.weight", "x.y")),
    "unet.mid.bias": KeySpec((4,), "float16", "diffuser", optional=True),
    "vae.conv_in.weight": KeySpec((3, 3), "float16", "vae"),
}, component_aliases={"unet": "diffuser"})


def _full_plan(header):
    """Renames ``unet.conv_in.weight`` to ``model.conv_in.weight`` doubling the values; other keys
    pass through under their own names."""
    out = {}
    for key, info in header.items():
        if key == "unet.conv_in.weight":
            out["model.conv_in.weight"] = ConvertedKey(info, (key,), lambda t, key=key: t[key] * 2)
        else:
            out[key] = ConvertedKey(info, (key,), lambda t, key=key: t[key])
    return out


def test_unet_only_architecture_keeps_the_unet_keys_without_the_prefix():
    arch = unet_only.architecture(FULL, "toy-unet", "a toy U-Net alone")
    assert arch == Architecture("toy-unet", {
        "conv_in.weight": KeySpec((4, 4), "float16", "diffuser", aliases=("old_conv_in.weight",)),
        "mid.bias": KeySpec((4,), "float16", "diffuser", optional=True)},
        description="a toy U-Net alone", component_aliases={"unet": "diffuser"})


def test_unet_only_plan_reads_the_files_own_names():
    plan = unet_only.plan(_full_plan)
    header = {"conv_in.weight": TensorInfo((2,), "float32"), "extra": TensorInfo((1,), "float32")}
    out = plan(header)
    assert sorted(out) == ["extra", "model.conv_in.weight"]
    assert out["model.conv_in.weight"].sources == ("conv_in.weight",)
    assert out["extra"].sources == ("extra",)
    tensors = {"conv_in.weight": torch.tensor([1.0, 3.0]), "extra": torch.tensor([5.0])}
    assert out["model.conv_in.weight"].compute(tensors).tolist() == [2.0, 6.0]
    assert out["extra"].compute(tensors).tolist() == [5.0]


# -- safetensors --------------------------------------------------------------------------------
def test_the_safetensors_helpers_write_and_read_a_file(tmp_path):
    path = tmp_path / "x.safetensors"
    kit.save({"b": torch.tensor([1.5, 2.5], dtype=torch.float16), "a": torch.arange(3)}, path, {"k": "v"})
    keys, metadata = kit.read_header(path)
    assert keys == {"a": TensorInfo((3,), "int64"), "b": TensorInfo((2,), "float16")} and metadata == {"k": "v"}
    assert load_file(path)["b"].tolist() == [1.5, 2.5]  # an independent reader
    f = kit.SafetensorsFile(path)
    try:
        assert set(f.keys) == {"a", "b"}
    finally:
        f.close()
    assert kit.is_float("bfloat16") and not kit.is_float("int64") and "float16" in kit.FLOAT_DTYPES
    assert kit.torch_dtype("float16") is torch.float16 and kit.dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(MechaError, match="--dtype must be one of"):
        kit.check_float_dtype("int8", "--dtype")


# -- synthetic checkpoints ---------------------------------------------------------------------
def test_key_table_takes_required_keys_and_casts_only_float_ones():
    assert synthetic.key_table(FULL) == {"unet.conv_in.weight": ((4, 4), "float16"),
                                         "vae.conv_in.weight": ((3, 3), "float16")}
    arch = Architecture("mixed", {"w": KeySpec((2,), "float16", "c"), "n": KeySpec((1,), "int64", "c", optional=True)})
    assert synthetic.key_table(arch, ["n", "w"], "float32") == {"n": ((1,), "int64"), "w": ((2,), "float32")}


def test_write_layout_writes_layout_values_in_table_order(tmp_path):
    table = {"w": ((2, 3), "float16"), "n": ((4,), "int64"), "e": ((0,), "float32")}
    path = synthetic.write_layout(tmp_path / "x.safetensors", table, seed=7, metadata={"m": "1"})
    again = synthetic.write_layout(tmp_path / "y.safetensors", table, seed=7, metadata={"m": "1"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes() != b""
    loaded = load_file(path)
    assert loaded["n"].tolist() == [0, 1, 2, 3]
    assert loaded["e"].shape == (0,)
    w = loaded["w"]
    assert w.dtype == torch.float16 and torch.equal(w, synthetic.layout_values(0, (2, 3), "float16", 7))
    assert 0 < w.float().abs().max() < 0.5  # small values, not zeros
    other_seed = synthetic.layout_values(0, (2, 3), "float16", 8)
    assert not torch.equal(w, other_seed)
    assert again.endswith("y.safetensors")


def test_write_header_only_makes_a_full_size_file_without_data(tmp_path):
    table = {"big": ((1024, 1024), "float32"), "small": ((3,), "float16")}
    path = synthetic.write_header_only(tmp_path / "h.safetensors", table)
    raw = (tmp_path / "h.safetensors").read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    assert header["big"] == {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024 * 1024]}
    assert header["small"]["data_offsets"] == [4 * 1024 * 1024, 4 * 1024 * 1024 + 6]
    assert len(raw) == 8 + header_size + 4 * 1024 * 1024 + 6
    assert kit.read_header(path)[0]["small"] == TensorInfo((3,), "float16")


# -- the package ---------------------------------------------------------------------------------
def test_kit_names_are_imported_on_first_use():
    code = ("import sys; import mecha_core.kit as k; from mecha_core.kit import load_packed, unet_name; "
            "print(sorted(m for m in sys.modules if m.startswith('mecha_core.kit.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['mecha_core.kit.diffusers', 'mecha_core.kit.layouts']"


def test_every_exported_name_is_the_modules_own():
    for name in kit.__all__:
        module, attribute = kit._EXPORTS[name]
        assert getattr(kit, name) is getattr(sys.modules[f"mecha_core.kit.{module}"], attribute)
    assert kit.unet_only_plan is unet_only.plan and kit.write_layout is synthetic.write_layout
    with pytest.raises(AttributeError, match="has no attribute 'table'"):
        kit.table  # noqa: B018
