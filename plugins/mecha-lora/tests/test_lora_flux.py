"""Flux LoRAs: kohya (BFL names), diffusers/PEFT (split q/k/v and the single blocks' fused
linear1 as row slices) and BFL/ai-toolkit PEFT spellings; applied to a checkpoint, merged into
one LoRA, and extracted; compared with plain torch. The table's names are checked at Flux.1-dev
size; the merges run on a down-scaled Flux table (the same code, computed from smaller sizes)."""

from __future__ import annotations

import attrs
import mecha_methods.plugin
import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_lora
import mecha_lora.plugin
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import plugin_from_functions, using, write_checkpoint
from mecha_lora import flux
from mecha_lora.tables import table

H, M = 32, 128  # the down-scaled table of the merge tests
FULL_H, FULL_M = 3072, 12288
P = "model.diffusion_model."
QKV = P + "double_blocks.0.img_attn.qkv.weight"
TXT_QKV = P + "double_blocks.0.txt_attn.qkv.weight"
PROJ = P + "double_blocks.0.img_attn.proj.weight"
LINEAR1 = P + "single_blocks.0.linear1.weight"
SHAPES = {QKV: (3 * H, H), TXT_QKV: (3 * H, H), PROJ: (H, H), LINEAR1: (3 * H + M, H)}


def _flux_stub():
    def architectures():
        return [Architecture(name, {m.key: KeySpec(m.key_shape, "bfloat16", "diffuser") for m in table(name).modules})
                for name in ("flux-dev", "flux-schnell")]

    return plugin_from_functions("flux_stub", mecha_architectures=architectures)


@pytest.fixture
def small_flux(monkeypatch):
    small = flux.FluxSizes(double_blocks=2, single_blocks=2, hidden=H, mlp_hidden=M, in_channels=8, context_dim=16,
                           pooled_dim=8)
    monkeypatch.setitem(flux.SIZES, "flux-dev", small)
    monkeypatch.setitem(flux.SIZES, "flux-schnell", attrs.evolve(small, guidance=False))
    table.cache_clear()
    yield
    table.cache_clear()


@pytest.fixture
def host(small_flux):
    with using(mecha_methods.plugin, mecha_lora.plugin, _flux_stub()) as h:
        yield h


def rnd(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def test_table_spellings_point_at_the_same_weights():
    t = table("flux-dev")
    # img_in, time/vector/guidance in and out, txt_in, the blocks, the final layer's two, CLIP-L
    assert len(t.modules) == 1 + 3 * 2 + 1 + 19 * 10 + 38 * 3 + 2 + 12 * 6
    assert len(table("flux-schnell").modules) == len(t.modules) - 2
    assert t.kohya("lora_unet_single_blocks_37_linear1").key == P + "single_blocks.37.linear1.weight"
    assert t.peft("diffusion_model.double_blocks.18.txt_mlp.2").key == P + "double_blocks.18.txt_mlp.2.weight"
    h, m = FULL_H, FULL_M
    for name, rows in (("attn.to_q", (0, h)), ("attn.to_k", (h, 2 * h)), ("attn.to_v", (2 * h, 3 * h)),
                       ("proj_mlp", (3 * h, 3 * h + m))):
        found = t.peft(f"transformer.single_transformer_blocks.5.{name}")
        assert (found.key, found.rows, found.key_shape) == (P + "single_blocks.5.linear1.weight", rows, (3 * h + m, h))
        assert t.peft(f"single_transformer_blocks.5.{name}") is found  # a transformer's own adapter: no prefix
        assert t.kohya(f"lora_transformer_single_transformer_blocks_5_{name.replace('.', '_')}") is found
    assert t.peft("transformer.transformer_blocks.2.attn.add_v_proj").rows == (2 * FULL_H, 3 * FULL_H)
    assert t.peft("transformer.transformer_blocks.2.attn.add_v_proj").key == P + "double_blocks.2.txt_attn.qkv.weight"
    norm = t.peft("transformer.transformer_blocks.2.norm1_context.linear")
    assert norm.key == P + "double_blocks.2.txt_mod.lin.weight" and norm.rows is None
    assert t.peft("transformer.norm_out.linear") is None  # halves swapped: no row slice can say that


def _pair(gen, out, inp, rank):
    return rnd(gen, rank, inp), rnd(gen, out, rank)


def _loras(gen):
    """Three LoRA files' tensors, and each one's ΔW per checkpoint key computed here."""
    deltas = [{}, {}, {}]

    def add(i, key, rows, down, up, scale):
        d = deltas[i].setdefault(key, torch.zeros(SHAPES[key]))
        start, end = rows or (0, SHAPES[key][0])
        d[start:end] += up @ down * scale

    kohya = {}
    down, up = _pair(gen, 3 * H, H, 4)
    kohya.update({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                  "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)})
    add(0, QKV, None, down, up, 2.0 / 4)
    down, up = _pair(gen, 3 * H + M, H, 2)
    kohya.update({"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
                  "lora_unet_single_blocks_0_linear1.lora_up.weight": up})
    add(0, LINEAR1, None, down, up, 1.0)  # no alpha tensor: alpha = rank

    peft = {}
    for name, key, rows, out in (("transformer_blocks.0.attn.to_q", QKV, (0, H), H),
                                 ("transformer_blocks.0.attn.to_v", QKV, (2 * H, 3 * H), H),
                                 ("transformer_blocks.0.attn.add_k_proj", TXT_QKV, (H, 2 * H), H),
                                 ("single_transformer_blocks.0.attn.to_k", LINEAR1, (H, 2 * H), H),
                                 ("single_transformer_blocks.0.proj_mlp", LINEAR1, (3 * H, 3 * H + M), M),
                                 ("transformer_blocks.0.attn.to_out.0", PROJ, None, H)):
        down, up = _pair(gen, out, H, 4)
        peft[f"transformer.{name}.lora_A.weight"], peft[f"transformer.{name}.lora_B.weight"] = down, up
        add(1, key, rows, down, up, 1.0)

    bfl = {}
    down, up = _pair(gen, H, H, 3)
    bfl["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"] = down
    bfl["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"] = up
    add(2, PROJ, None, down, up, 1.0)
    down, up = _pair(gen, 3 * H, H, 3)
    bfl["diffusion_model.double_blocks.0.txt_attn.qkv.lora_A.weight"] = down
    bfl["diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.weight"] = up
    add(2, TXT_QKV, None, down, up, 1.0)
    return (kohya, peft, bfl), deltas


def _base(tmp_path, gen, name="base.safetensors"):
    tensors = {k: rnd(gen, *s, scale=1.0).to(torch.bfloat16) for k, s in SHAPES.items()}
    tensors[P + "img_in.bias"] = rnd(gen, H, scale=1.0).to(torch.bfloat16)  # no LoRA touches it
    write_checkpoint(tmp_path / name, tensors)
    return tmp_path / name, tensors


def test_apply_each_spelling(host, tmp_path):
    gen = torch.Generator().manual_seed(0)
    base_path, base = _base(tmp_path, gen)
    files, deltas = _loras(gen)
    paths = []
    for i, tensors in enumerate(files):
        paths.append(tmp_path / f"lora{i}.safetensors")
        write_checkpoint(paths[-1], tensors)
    strengths = (0.8, 0.5, 1.5)
    recipe = mecha_core.model(str(base_path))
    for path, m in zip(paths, strengths):
        recipe = mecha_core.apply_lora(recipe, mecha_core.model(str(path)), strength=m)
    out = tmp_path / "out.safetensors"
    mecha_core.merge(recipe, out, threads=2, output_dtype="float32")
    merged = load_file(str(out))
    for key in SHAPES:
        want = base[key].float() + sum(m * d[key] for m, d in zip(strengths, deltas) if key in d)
        torch.testing.assert_close(merged[key], want, rtol=0, atol=2e-5, msg=key)
    assert torch.equal(merged[P + "img_in.bias"], base[P + "img_in.bias"].float())
    # each file changed something: the comparison could fail
    assert all(deltas[i] for i in range(3))


def test_peft_file_of_a_bare_transformer_and_kohya_diffusers_names(host, tmp_path):
    gen = torch.Generator().manual_seed(1)
    base_path, base = _base(tmp_path, gen)
    down, up = _pair(gen, H, H, 4)
    down2, up2 = _pair(gen, M, H, 2)
    write_checkpoint(tmp_path / "bare.safetensors", {
        "transformer_blocks.0.attn.to_k.lora_A.weight": down, "transformer_blocks.0.attn.to_k.lora_B.weight": up})
    write_checkpoint(tmp_path / "kd.safetensors", {
        "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_down.weight": down2,
        "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_up.weight": up2,
        "lora_transformer_single_transformer_blocks_0_proj_mlp.alpha": torch.tensor(1.0)})
    recipe = mecha_core.apply_lora(mecha_core.apply_lora(mecha_core.model(str(base_path)),
                                                         mecha_core.model(str(tmp_path / "bare.safetensors"))),
                                   mecha_core.model(str(tmp_path / "kd.safetensors")))
    out = tmp_path / "out.safetensors"
    mecha_core.merge(recipe, out, threads=2, output_dtype="float32")
    merged = load_file(str(out))
    want = base[QKV].float()
    want[H:2 * H] += up @ down
    torch.testing.assert_close(merged[QKV], want, rtol=0, atol=2e-5)
    want = base[LINEAR1].float()
    want[3 * H:] += up2 @ down2 * 0.5
    torch.testing.assert_close(merged[LINEAR1], want, rtol=0, atol=2e-5)


def test_norm_out_is_reported_not_guessed(host, tmp_path):
    gen = torch.Generator().manual_seed(2)
    base_path, _ = _base(tmp_path, gen)
    down, up = _pair(gen, 2 * H, H, 2)
    write_checkpoint(tmp_path / "n.safetensors", {"transformer.norm_out.linear.lora_A.weight": down,
                                                  "transformer.norm_out.linear.lora_B.weight": up,
                                                  "transformer.proj_out.lora_A.weight": rnd(gen, 2, H),
                                                  "transformer.proj_out.lora_B.weight": rnd(gen, 8, 2)})
    recipe = mecha_core.apply_lora(mecha_core.model(str(base_path)), mecha_core.model(str(tmp_path / "n.safetensors")))
    with pytest.raises(mecha_core.MechaError, match="norm_out.linear"):
        mecha_core.merge(recipe, tmp_path / "out.safetensors", threads=2)


def test_merge_loras_across_spellings(host, tmp_path):
    gen = torch.Generator().manual_seed(3)
    files, deltas = _loras(gen)
    paths = []
    for i, tensors in enumerate(files):
        paths.append(tmp_path / f"lora{i}.safetensors")
        write_checkpoint(paths[-1], tensors)
    weights = [1.0, -0.5, 2.0]
    out = tmp_path / "merged.safetensors"
    mecha_lora.merge_loras(paths, out, weights=weights, dtype="float32")
    merged = load_file(str(out))
    assert all(k.startswith(("lora_unet_", "lora_transformer_")) for k in merged)
    got: dict[str, torch.Tensor] = {}
    t = table("flux-dev")
    for key in merged:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.split(".")[0]
        module = t.kohya(name)
        down, up = merged[key], merged[f"{name}.lora_up.weight"]
        alpha = merged[f"{name}.alpha"].item() if f"{name}.alpha" in merged else down.shape[0]
        d = got.setdefault(module.key, torch.zeros(SHAPES[module.key]))
        start, end = module.rows or (0, SHAPES[module.key][0])
        d[start:end] += up @ down * alpha / down.shape[0]
    want = {}
    for w, d in zip(weights, deltas):
        for key, value in d.items():
            want[key] = want.get(key, 0) + w * value
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-5, msg=key)


def test_extract_from_bfl_files(host, tmp_path):
    gen = torch.Generator().manual_seed(4)
    base = {k.removeprefix(P): rnd(gen, *s, scale=1.0) for k, s in SHAPES.items() if k in (QKV, PROJ)}
    down, up = _pair(gen, 3 * H, H, 3)
    tuned = dict(base)
    tuned["double_blocks.0.img_attn.qkv.weight"] = base["double_blocks.0.img_attn.qkv.weight"] + up @ down
    write_checkpoint(tmp_path / "base.safetensors", base)
    write_checkpoint(tmp_path / "tuned.safetensors", tuned)
    out = tmp_path / "x.safetensors"
    mecha_lora.extract_lora(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", out, rank=3)
    lora = load_file(str(out))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert {k.split(".")[0] for k in lora} == {name}  # proj did not change: left out
    got = lora[f"{name}.lora_up.weight"].float() @ lora[f"{name}.lora_down.weight"].float()
    got *= lora[f"{name}.alpha"].item() / 3
    torch.testing.assert_close(got, up @ down, rtol=0, atol=1e-4)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev/lora"
