"""Each LoRA-family algorithm applied to SD1 weights, checked against its formula written here.

Every touched weight is compared with W + m·ΔW (OFT, BOFT, DoRA, (IA)^3 with their own rules)
computed in the test from the file's factors; every other key must come out bit-identical.
"""

from __future__ import annotations

import pytest
import torch

import mecha_core
from mecha_core.errors import MechaError

SD1 = "sd1-ldm"
Q_PROJ = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"          # linear 768x768
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # linear 320x768
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"                 # 1x1 conv 320x320
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"                        # 3x3 conv 320x320
CONV2 = "lora_unet_down_blocks_0_resnets_1_conv2"                        # 3x3 conv 320x320
TO_OUT = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0"  # linear 320x320


def rnd(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def mods(kit, *names):
    return [kit.module(SD1, n) for n in names]


def check_untouched(out, base, touched):
    untouched = [k for k in base if k not in touched]
    assert len(untouched) >= 3
    for key in untouched:
        assert torch.equal(out[key], base[key]), key


def apply(kit, tmp_path, base_path, lora_tensors, strength, method="apply_lora"):
    lora_path = tmp_path / "lora.safetensors"
    kit.write(lora_path, lora_tensors)
    base, lora = mecha_core.model(str(base_path)), mecha_core.model(str(lora_path))
    if method == "apply_lora":
        recipe = mecha_core.apply_lora(base, lora, strength=strength)
    else:
        recipe = mecha_core.add_difference(base, lora, alpha=strength)
    return kit.merge(recipe, tmp_path)


@pytest.mark.parametrize("method", ["add_difference", "apply_lora"])
def test_plain_lora_and_locon(host, kit, tmp_path, method):
    gen = torch.Generator().manual_seed(1)
    q, k, p, c = mods(kit, Q_PROJ, TO_K, PROJ_IN, CONV1)
    base_path, base = kit.make_base(tmp_path, [q, k, p, c, kit.module(SD1, CONV2)])
    lora, expected_delta = {}, {}
    # linear, alpha != rank
    for m, rank, alpha in ((q, 8, 4.0), (k, 4, 1.0)):
        down, up = rnd(gen, rank, m.shape[1]), rnd(gen, m.shape[0], rank)
        lora |= {f"{m.kohya_name}.lora_down.weight": down, f"{m.kohya_name}.lora_up.weight": up,
                 f"{m.kohya_name}.alpha": torch.tensor(alpha)}
        expected_delta[m.key] = alpha / rank * torch.einsum("or,ri->oi", up, down)
    # 1x1 conv without an alpha tensor (alpha = rank)
    down, up = rnd(gen, 4, 320, 1, 1), rnd(gen, 320, 4, 1, 1)
    lora |= {f"{p.kohya_name}.lora_down.weight": down, f"{p.kohya_name}.lora_up.weight": up}
    expected_delta[p.key] = torch.einsum("or,ri->oi", up[:, :, 0, 0], down[:, :, 0, 0])[:, :, None, None]
    # LoCon 3x3: down [r, in, 3, 3], up [out, r, 1, 1]
    down, up = rnd(gen, 6, 320, 3, 3), rnd(gen, 320, 6, 1, 1)
    lora |= {f"{c.kohya_name}.lora_down.weight": down, f"{c.kohya_name}.lora_up.weight": up,
             f"{c.kohya_name}.alpha": torch.tensor(3.0)}
    expected_delta[c.key] = 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)

    out = apply(kit, tmp_path, base_path, lora, 0.8, method)
    for key, delta in expected_delta.items():
        torch.testing.assert_close(out[key], base[key] + 0.8 * delta, rtol=1e-5, atol=1e-6)
        assert not torch.equal(out[key], base[key])
    check_untouched(out, base, expected_delta)


def test_locon_tucker_loha_lokr(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(2)
    q, k, p, c1, c2, o = mods(kit, Q_PROJ, TO_K, PROJ_IN, CONV1, CONV2, TO_OUT)
    base_path, base = kit.make_base(tmp_path, [q, k, p, c1, c2, o])
    lora, expected = {}, {}

    # LoCon with Tucker lora_mid on a 3x3 conv
    n, r = c1.kohya_name, 4
    down, mid, up = (rnd(gen, r, 320, 1, 1, scale=0.3), rnd(gen, r, r, 3, 3, scale=0.3),
                     rnd(gen, 320, r, 1, 1, scale=0.3))
    lora |= {f"{n}.lora_down.weight": down, f"{n}.lora_mid.weight": mid, f"{n}.lora_up.weight": up,
             f"{n}.alpha": torch.tensor(2.0)}
    inner = torch.einsum("abyx,bi->aiyx", mid, down[:, :, 0, 0])
    expected[c1.key] = (2.0 / r) * torch.einsum("oa,aiyx->oiyx", up[:, :, 0, 0], inner)

    # LoHa on a linear: (w1a w1b) ⊙ (w2a w2b) · alpha/r
    n, r = q.kohya_name, 4
    w1a, w1b, w2a, w2b = (rnd(gen, 768, r, scale=0.3), rnd(gen, r, 768, scale=0.3),
                          rnd(gen, 768, r, scale=0.3), rnd(gen, r, 768, scale=0.3))
    lora |= {f"{n}.hada_w1_a": w1a, f"{n}.hada_w1_b": w1b, f"{n}.hada_w2_a": w2a, f"{n}.hada_w2_b": w2b,
             f"{n}.alpha": torch.tensor(1.0)}
    expected[q.key] = (1.0 / r) * (w1a @ w1b) * (w2a @ w2b)

    # LoHa with Tucker on a 3x3 conv: rank-first factors [r, out] / [r, in]
    n, r = c2.kohya_name, 3
    t1, t2 = rnd(gen, r, r, 3, 3, scale=0.5), rnd(gen, r, r, 3, 3, scale=0.5)
    a1, b1, a2, b2 = (rnd(gen, r, 320, scale=0.5) for _ in range(4))
    lora |= {f"{n}.hada_t1": t1, f"{n}.hada_t2": t2, f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1,
             f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2, f"{n}.alpha": torch.tensor(3.0)}

    def tucker(core, left, right):
        out = torch.zeros(320, 320, 3, 3)
        for pp in range(r):
            for qq in range(r):
                out += core[pp, qq][None, None] * torch.outer(left[pp], right[qq])[:, :, None, None]
        return out

    expected[c2.key] = tucker(t1, a1, b1) * tucker(t2, a2, b2)

    # LoKr, W1 factorised (a=4, c=12, rank 2), W2 full [b=80, d=64] on the 320x768 linear
    n = k.kohya_name
    w1a, w1b, w2 = rnd(gen, 4, 2, scale=0.5), rnd(gen, 2, 12, scale=0.5), rnd(gen, 80, 64, scale=0.5)
    lora |= {f"{n}.lokr_w1_a": w1a, f"{n}.lokr_w1_b": w1b, f"{n}.lokr_w2": w2, f"{n}.alpha": torch.tensor(1.0)}
    w1 = w1a @ w1b
    expected[k.key] = 0.5 * torch.einsum("ij,pq->ipjq", w1, w2).reshape(320, 768)

    # LoKr, both full matrices (scale 1 whatever alpha says) on the 1x1 conv: [16,16] ⊗ [20,20,1,1]
    n = p.kohya_name
    w1, w2 = rnd(gen, 16, 16, scale=0.5), rnd(gen, 20, 20, 1, 1, scale=0.5)
    lora |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2": w2, f"{n}.alpha": torch.tensor(7.0)}
    expected[p.key] = torch.einsum("ij,pqyx->ipjqyx", w1, w2).reshape(320, 320, 1, 1)

    # LoKr with Tucker W2 on... a linear has no kernel; use factorised W2 (rank 3) on to_out
    n = o.kohya_name
    w1, w2a, w2b = rnd(gen, 8, 8, scale=0.5), rnd(gen, 40, 3, scale=0.5), rnd(gen, 3, 40, scale=0.5)
    lora |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": torch.tensor(6.0)}
    expected[o.key] = 2.0 * torch.einsum("ij,pq->ipjq", w1, w2a @ w2b).reshape(320, 320)

    out = apply(kit, tmp_path, base_path, lora, 0.7)
    for key, delta in expected.items():
        torch.testing.assert_close(out[key], base[key] + 0.7 * delta, rtol=1e-4, atol=1e-5)
        assert (out[key] - base[key]).abs().max() > 1e-3, key
    check_untouched(out, base, expected)


def test_lokr_tucker_conv(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(3)
    (c,) = mods(kit, CONV1)
    base_path, base = kit.make_base(tmp_path, [c])
    n, r = c.kohya_name, 3
    w1 = rnd(gen, 4, 4, scale=0.5)                       # a = c = 4
    t2, w2a, w2b = rnd(gen, r, r, 3, 3, scale=0.5), rnd(gen, r, 80, scale=0.5), rnd(gen, r, 80, scale=0.5)
    lora = {f"{n}.lokr_w1": w1, f"{n}.lokr_t2": t2, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b,
            f"{n}.alpha": torch.tensor(1.5)}
    w2 = torch.einsum("ijyx,ip,jq->pqyx", t2, w2a, w2b)   # [80, 80, 3, 3]
    delta = 0.5 * torch.einsum("ij,pqyx->ipjqyx", w1, w2).reshape(320, 320, 3, 3)
    out = apply(kit, tmp_path, base_path, lora, 1.0)
    torch.testing.assert_close(out[c.key], base[c.key] + delta, rtol=1e-4, atol=1e-5)
    check_untouched(out, base, {c.key})


def cayley_reference(blocks):
    """R = (I − Q)^-1 (I + Q) per block (equal to (I + Q)(I − Q)^-1: the factors commute)."""
    q = blocks - blocks.transpose(1, 2)
    eye = torch.eye(blocks.shape[-1]).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q)


def test_oft_lycoris_and_kohya(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(4)
    q, c = mods(kit, Q_PROJ, CONV1)
    o = kit.module(SD1, TO_OUT)
    base_path, base = kit.make_base(tmp_path, [q, c, o])
    m = 0.6
    # LyCORIS diag-OFT on a linear: 24 blocks of 32, no active constraint (alpha = 0), rescale
    blocks_q = rnd(gen, 24, 32, 32, scale=0.02)
    rescale = 1 + rnd(gen, 768, 1, scale=0.1)
    # LyCORIS OFT on a 3x3 conv with an active constraint: c = alpha·out < ||Q||
    blocks_c = rnd(gen, 10, 32, 32, scale=0.05)
    q_norm = torch.linalg.vector_norm(blocks_c - blocks_c.transpose(1, 2))
    alpha_c = float(q_norm) / 320 / 2  # the constraint halves Q
    # kohya OFT (oft_unet_ name): always clamped to alpha·out
    blocks_o = rnd(gen, 8, 40, 40, scale=0.05)
    alpha_o = 1e-3
    lora = {
        f"{q.kohya_name}.oft_blocks": blocks_q, f"{q.kohya_name}.alpha": torch.tensor(0.0),
        f"{q.kohya_name}.rescale": rescale,
        f"{c.kohya_name}.oft_blocks": blocks_c, f"{c.kohya_name}.alpha": torch.tensor(alpha_c),
        "oft_" + o.name.removeprefix("") + ".oft_blocks": blocks_o,
        "oft_" + o.name + ".alpha": torch.tensor(alpha_o),
    }
    out = apply(kit, tmp_path, base_path, lora, m)

    def rotate(weight, rotations):
        r = m * rotations + (1 - m) * torch.eye(rotations.shape[-1])
        big = torch.block_diag(*r)
        return (big.T @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)

    r_q = cayley_reference(blocks_q)
    assert torch.allclose(r_q[0] @ r_q[0].T, torch.eye(32), atol=1e-5)  # orthogonal
    expected_q = rotate(base[q.key], r_q) * (1 + m * (rescale - 1))
    torch.testing.assert_close(out[q.key], expected_q, rtol=1e-4, atol=1e-5)

    expected_c = rotate(base[c.key], cayley_reference(blocks_c / 2))
    torch.testing.assert_close(out[c.key], expected_c, rtol=1e-4, atol=1e-5)

    q_o = blocks_o - blocks_o.transpose(1, 2)
    limit = alpha_o * 320
    scaled = blocks_o * (limit / float(torch.linalg.vector_norm(q_o)))  # clamp applies to Q's norm
    expected_o = rotate(base[o.key], cayley_reference(scaled))
    torch.testing.assert_close(out[o.key], expected_o, rtol=1e-4, atol=1e-5)
    for key in (q.key, c.key, o.key):
        assert (out[key] - base[key]).abs().max() > 1e-3
    check_untouched(out, base, {q.key, c.key, o.key})


def butterfly_permutation(rows, h):
    """Row order of one BOFT stage: rows grouped as (c, 2, h) are read as (c, h, 2)."""
    order = []
    for group in range(rows // (2 * h)):
        for j in range(h):
            for side in range(2):
                order.append(group * 2 * h + side * h + j)
    return torch.tensor(order)


def test_boft(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(5)
    (k,) = mods(kit, TO_K)  # 320 rows = 4 blocks of 80; log2(4) + 1 = 3 stages
    base_path, base = kit.make_base(tmp_path, [k])
    blocks = rnd(gen, 3, 4, 80, 80, scale=0.02)
    rescale = 1 + rnd(gen, 320, 1, scale=0.1)
    lora = {f"{k.kohya_name}.oft_blocks": blocks, f"{k.kohya_name}.alpha": torch.tensor(0.0),
            f"{k.kohya_name}.rescale": rescale}
    m = 0.75
    out = apply(kit, tmp_path, base_path, lora, m)
    x = base[k.key].clone()
    for stage in range(3):
        r = m * cayley_reference(blocks[stage]) + (1 - m) * torch.eye(80)
        perm = butterfly_permutation(320, (2 ** stage) * 40)
        rotated = torch.block_diag(*r) @ x[perm]
        x = torch.empty_like(x)
        x[perm] = rotated
    expected = x * (1 + m * (rescale - 1))
    torch.testing.assert_close(out[k.key], expected, rtol=1e-4, atol=1e-5)
    assert (out[k.key] - base[k.key]).abs().max() > 1e-3


def test_dora_both_axes_and_ia3(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(6)
    q, c, k = mods(kit, Q_PROJ, CONV1, TO_K)
    base_path, base = kit.make_base(tmp_path, [q, c, k])
    m = 0.8
    # DoRA on a LoRA linear, magnitude per output row [out, 1]
    down, up = rnd(gen, 4, 768), rnd(gen, 768, 4)
    mag_q = 1 + rnd(gen, 768, 1, scale=0.2)
    # DoRA on a LoCon 3x3 conv, magnitude per input column [1, in, 1, 1] (older LyCORIS)
    down_c, up_c = rnd(gen, 4, 320, 3, 3), rnd(gen, 320, 4, 1, 1)
    mag_c = 1 + rnd(gen, 1, 320, 1, 1, scale=0.2)
    # (IA)^3 scaling output rows of to_k
    ia3 = rnd(gen, 320, scale=0.3)
    lora = {
        f"{q.kohya_name}.lora_down.weight": down, f"{q.kohya_name}.lora_up.weight": up,
        f"{q.kohya_name}.alpha": torch.tensor(2.0), f"{q.kohya_name}.dora_scale": mag_q,
        f"{c.kohya_name}.lora_down.weight": down_c, f"{c.kohya_name}.lora_up.weight": up_c,
        f"{c.kohya_name}.dora_scale": mag_c,
        f"{k.kohya_name}.weight": ia3, f"{k.kohya_name}.on_input": torch.tensor(0),
    }
    out = apply(kit, tmp_path, base_path, lora, m)

    w = base[q.key]
    v = w + 0.5 * up @ down
    dora = mag_q * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out[q.key], w + m * (dora - w), rtol=1e-4, atol=1e-5)

    w = base[c.key]
    v = w + torch.einsum("or,rikl->oikl", up_c[:, :, 0, 0], down_c)
    col_norm = v.transpose(0, 1).reshape(320, -1).norm(dim=1).reshape(1, 320, 1, 1)
    dora = mag_c * v / col_norm
    torch.testing.assert_close(out[c.key], w + m * (dora - w), rtol=1e-4, atol=1e-5)

    torch.testing.assert_close(out[k.key], base[k.key] * (1 + m * ia3)[:, None], rtol=1e-5, atol=1e-6)
    check_untouched(out, base, {q.key, c.key, k.key})


def test_base_dependent_module_refused_as_plain_delta(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(7)
    (q,) = mods(kit, Q_PROJ)
    base_path, _ = kit.make_base(tmp_path, [q])
    lora_path = tmp_path / "oft.safetensors"
    kit.write(lora_path, {f"{q.kohya_name}.oft_blocks": rnd(gen, 24, 32, 32),
                          f"{q.kohya_name}.alpha": torch.tensor(0.0)})
    recipe = mecha_core.add_difference(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)), alpha=0.5)
    with pytest.raises(MechaError, match=r"OFT module depends on the base weight.*apply_lora"):
        mecha_core.merge(recipe, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_strength_zero_is_identity_for_every_operator(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(8)
    q, k = mods(kit, Q_PROJ, TO_K)
    base_path, base = kit.make_base(tmp_path, [q, k])
    lora = {f"{q.kohya_name}.oft_blocks": rnd(gen, 24, 32, 32), f"{q.kohya_name}.alpha": torch.tensor(0.0),
            f"{k.kohya_name}.lora_down.weight": rnd(gen, 4, 768), f"{k.kohya_name}.lora_up.weight": rnd(gen, 320, 4),
            f"{k.kohya_name}.dora_scale": 1 + rnd(gen, 320, 1)}
    out = apply(kit, tmp_path, base_path, lora, 0.0)
    for key in base:
        torch.testing.assert_close(out[key], base[key], rtol=0, atol=1e-6)


def test_glora_full_diff_and_ia3_on_input(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(9)
    q, k, c = mods(kit, Q_PROJ, TO_K, CONV1)
    bias_key = k.key.removesuffix("weight") + "bias"
    base_path, base = kit.make_base(tmp_path, [q, k, c], extra={bias_key: (320,)})
    m = 0.5
    # GLoRA on a linear: ΔW = alpha/r · (W A1 A2 + B1 B2)
    n, r = q.kohya_name, 4
    a1, a2, b1, b2 = rnd(gen, 768, r, scale=0.2), rnd(gen, r, 768, scale=0.2), rnd(gen, 768, r), rnd(gen, r, 768)
    # full/diff with a bias delta
    diff, diff_b = rnd(gen, 320, 768), rnd(gen, 320)
    # (IA)^3 scaling input columns of a conv
    ia3 = rnd(gen, 320, scale=0.3)
    lora = {f"{n}.a1.weight": a1, f"{n}.a2.weight": a2, f"{n}.b1.weight": b1, f"{n}.b2.weight": b2,
            f"{n}.alpha": torch.tensor(2.0),
            f"{k.kohya_name}.diff": diff, f"{k.kohya_name}.diff_b": diff_b,
            f"{c.kohya_name}.weight": ia3, f"{c.kohya_name}.on_input": torch.tensor(1)}
    out = apply(kit, tmp_path, base_path, lora, m)
    w = base[q.key]
    torch.testing.assert_close(out[q.key], w + m * 0.5 * (w @ a1 @ a2 + b1 @ b2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[k.key], base[k.key] + m * diff, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[bias_key], base[bias_key] + m * diff_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[c.key], base[c.key] * (1 + m * ia3)[None, :, None, None], rtol=1e-5, atol=1e-6)
    check_untouched(out, base, {q.key, k.key, c.key, bias_key})


def test_operator_in_other_methods_and_alone_is_a_clear_error(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(10)
    (q,) = mods(kit, Q_PROJ)
    dora = {f"{q.kohya_name}.lora_down.weight": rnd(gen, 4, 768), f"{q.kohya_name}.lora_up.weight": rnd(gen, 768, 4),
            f"{q.kohya_name}.dora_scale": 1 + rnd(gen, 768, 1)}
    plain = {f"{q.kohya_name}.lora_down.weight": rnd(gen, 4, 768), f"{q.kohya_name}.lora_up.weight": rnd(gen, 768, 4)}
    kit.write(tmp_path / "dora.safetensors", dora)
    kit.write(tmp_path / "plain.safetensors", plain)
    a, b = mecha_core.model(str(tmp_path / "dora.safetensors")), mecha_core.model(str(tmp_path / "plain.safetensors"))
    for recipe in (mecha_core.weighted_sum(b, a, alpha=0.5), a):
        with pytest.raises(MechaError, match=r"key 'cond_stage_model.*q_proj.weight'.*DoRA.*apply_lora"):
            mecha_core.merge(recipe, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
    # plain LoRAs combine as deltas: the written delta is 0.5·ΔW
    out = kit.merge(mecha_core.scale(b, alpha=0.5), tmp_path)
    expected = 0.5 * plain[f"{q.kohya_name}.lora_up.weight"] @ plain[f"{q.kohya_name}.lora_down.weight"]
    torch.testing.assert_close(out[q.key], expected, rtol=1e-5, atol=1e-7)
    assert list(out) == [q.key]


def test_plugin_contract():
    import mecha_lora.plugin
    from mecha_core.testing import check_plugin

    assert check_plugin(mecha_lora.plugin) == []
