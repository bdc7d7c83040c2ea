"""mergekit's tokenizer_source / tokenizer: / chat_template: tiny Llama models with small WordLevel
tokenizers built here (vocabularies that differ by added tokens), merged by mecha and checked row
by row against mergekit 0.1.5's rules written out below (mergekit/tokenizer/build.py, embed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file

import mecha_core as mecha
from mecha_core.errors import RecipeError

WORDS = [f"w{i}" for i in range(20)]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"


def _tokenizer(added: list[str], template: str | None = None):
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    tok.add_tokens(added)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory):
    """{"base": 22 tokens, "b": + <x> <y>, "c": + <y> <z>, "d": the base's tokens, no chat template}
    -> folder (tokenizer and Llama weights)."""
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for i, (name, added, template) in enumerate([("base", [], TEMPLATE), ("b", ["<x>", "<y>"], TEMPLATE),
                                                 ("c", ["<y>", "<z>"], None), ("d", [], None)]):
        tok = _tokenizer(added, template)
        torch.manual_seed(10 + i)
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=12,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=4, max_position_embeddings=16, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def vocab_of(folder):
    return json.load(open(os.path.join(folder, "tokenizer.json")))


def token_ids(folder) -> dict[str, int]:
    data = vocab_of(folder)
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return ids


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def run(tmp_path, text, name="out"):
    (tmp_path / f"{name}.yml").write_text(text)
    return mecha.merge(str(tmp_path / f"{name}.yml"), str(tmp_path / name) + "/")


def expected_rows(key, out_vocab, models, base, tokens=None):
    """Each model's rows in the output vocabulary, by mergekit's fill rules (embed.py)."""
    tokens = tokens or {}
    ids = {m: token_ids(f) for m, f in models.items()}
    rows = {m: weights(f)[key] for m, f in models.items()}
    out = {m: torch.zeros(len(out_vocab), rows[m].shape[1]) for m in models}
    for token, i in out_vocab.items():
        have = [m for m in models if token in ids[m]]
        cfg = tokens.get(token)
        if cfg is not None:
            kind, ref, arg, _ = cfg
            default = (torch.zeros(rows[base].shape[1]) if kind == "zero" else
                       rows[ref][arg] if kind == "model_token" else rows[ref][ids[ref][token]])
        elif len(have) == 1:
            default = rows[have[0]][ids[have[0]][token]]
        elif not have:
            default = torch.zeros(rows[base].shape[1])
        elif base in have:
            default = rows[base][ids[base][token]]
        else:
            default = sum(rows[m][ids[m][token]] for m in have) / len(have)
        forced = cfg is not None and cfg[3]
        for m in models:
            out[m][i] = rows[m][ids[m][token]] if token in ids[m] and not forced else default
    return out


def linear(rows, weights_):
    total = sum(weights_.values())
    return sum(rows[m] * w for m, w in weights_.items()) / total


def test_union_fills_rows_as_mergekit_and_the_output_loads(tmp_path, vocab_models):
    m = vocab_models
    folder = run(tmp_path, f"merge_method: linear\nbase_model: {m['base']}\ntokenizer_source: union\n"
                           f"models:\n  - model: {m['b']}\n    parameters: {{weight: 1}}\n"
                           f"  - model: {m['c']}\n    parameters: {{weight: 3}}\n"
                           f"  - model: {m['base']}\n    parameters: {{weight: 2}}\n")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, "<x>": 22, "<y>": 23, "<z>": 24}
    assert tok.get_vocab() == want
    out = weights(folder)
    for key in (EMBED, HEAD):
        rows = expected_rows(key, want, {"b": m["b"], "c": m["c"], "base": m["base"]}, "base")
        torch.testing.assert_close(out[key], linear(rows, {"b": 1, "c": 3, "base": 2}), rtol=1e-6, atol=1e-7)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["vocab_size"] == 25
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape == (25, 8)
    assert torch.equal(model.get_input_embeddings().weight.detach(), out[EMBED])


def test_union_without_base_averages_the_models_that_have_a_token(tmp_path, vocab_models):
    m = vocab_models
    # <y> is in b and c, not the base (the first model, c): its row is the mean of theirs
    folder = run(tmp_path, f"merge_method: linear\ntokenizer_source: union\nmodels:\n"
                           f"  - model: {m['c']}\n    parameters: {{weight: 1}}\n"
                           f"  - model: {m['b']}\n    parameters: {{weight: 1}}\n"
                           f"  - model: {m['base']}\n    parameters: {{weight: 1}}\n")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids_c = token_ids(m["c"])
    assert {t: tok.get_vocab()[t] for t in ids_c} == ids_c and tok.get_vocab()["<x>"] == 24
    rows = expected_rows(EMBED, tok.get_vocab(), {"c": m["c"], "b": m["b"], "base": m["base"]}, "c")
    # mergekit's "base" is the first model: c has <y>, so <y> comes from c, not a mean
    torch.testing.assert_close(weights(folder)[EMBED], linear(rows, {"c": 1, "b": 1, "base": 1}),
                               rtol=1e-6, atol=1e-7)


def test_base_source_cuts_the_other_vocabularies(tmp_path, vocab_models):
    m = vocab_models
    folder = run(tmp_path, f"merge_method: task_arithmetic\nbase_model: {m['base']}\ntokenizer_source: base\n"
                           f"models:\n  - model: {m['b']}\n    parameters: {{weight: 0.5}}\n")
    ids = token_ids(m["base"])
    assert transformers.AutoTokenizer.from_pretrained(folder).get_vocab() == ids
    base, b = weights(m["base"]), weights(m["b"])
    for key in (EMBED, HEAD):
        want = base[key] + 0.5 * (b[key][:len(ids)] - base[key])
        torch.testing.assert_close(weights(folder)[key], want, rtol=1e-6, atol=1e-7)
    assert json.load(open(os.path.join(folder, "config.json")))["vocab_size"] == len(ids)


def test_a_model_source_and_a_tokens_section(tmp_path, vocab_models):
    m = vocab_models
    text = (f"merge_method: linear\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['base']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {m['b']}\n    parameters: {{weight: 1}}\n"
            f"tokenizer:\n  source: {m['b']}\n  pad_to_multiple_of: 8\n  tokens:\n"
            f"    <x>:\n      source: {{kind: model_token, model: {m['base']}, token: w3}}\n"
            f"    w5:\n      source: {{kind: zero}}\n      force: true\n"
            f"    <new>:\n      source: {m['b']}\n"
            f"    <q>:\n      source: {{kind: model_token, model: {m['b']}, token_id: 23}}\n")
    with pytest.raises(RecipeError, match=r"out\.yml:17:.*'<new>' is not in the tokenizer of model"):
        run(tmp_path, text)
    text = text.replace(f"    <new>:\n      source: {m['b']}\n", "")
    folder = run(tmp_path, text)
    vocab = transformers.AutoTokenizer.from_pretrained(folder).get_vocab()
    assert vocab == {**token_ids(m["b"]), "<q>": 24}
    ids_base = token_ids(m["base"])
    tokens = {"<x>": ("model_token", "base", ids_base["w3"], False), "w5": ("zero", None, None, True),
              "<q>": ("model_token", "b", 23, False)}
    out = weights(folder)
    for key in (EMBED, HEAD):
        rows = expected_rows(key, vocab, {"base": m["base"], "b": m["b"]}, "base", tokens)
        merged = linear(rows, {"base": 1, "b": 1})
        torch.testing.assert_close(out[key][:25], merged, rtol=1e-6, atol=1e-7)
        assert out[key].shape[0] == 32  # padded to a multiple of 8 with each model's mean row
        pad = linear({k: r.mean(dim=0) for k, r in rows.items()}, {"base": 1, "b": 1})
        torch.testing.assert_close(out[key][25:], pad.expand(7, -1), rtol=1e-6, atol=1e-7)
    assert json.load(open(os.path.join(folder, "config.json")))["vocab_size"] == 32
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).get_output_embeddings().weight.shape[0] == 32


@pytest.mark.parametrize("setting,expected", [("auto", TEMPLATE), ("{% for m in messages %}{{ m['content'] }}"
                                                                    "|{% endfor %}", None)])
def test_chat_template(tmp_path, vocab_models, setting, expected):
    m = vocab_models
    folder = run(tmp_path, f"merge_method: linear\nmodels:\n  - model: {m['d']}\n    parameters: {{weight: 1}}\n"
                           f"  - model: {m['base']}\n    parameters: {{weight: 3}}\n"
                           f"chat_template: {json.dumps(setting)}\n")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == (expected or setting)
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert text == ("<<user>>w1 w2\n" if expected else "w1 w2|")
    # the tokenizer is the first model's (d), written again with the template
    assert tok.get_vocab() == token_ids(m["d"])
    d, base = weights(m["d"]), weights(m["base"])
    for key in (EMBED, "model.norm.weight"):
        torch.testing.assert_close(weights(folder)[key], (d[key] + 3 * base[key]) / 4, rtol=1e-6, atol=1e-7)


def test_a_builtin_template_comes_from_mergekit_when_installed(tmp_path, vocab_models, monkeypatch):
    m = vocab_models
    text = f"merge_method: passthrough\nmodels:\n  - model: {m['base']}\nchat_template: chatml\n"
    fake = tmp_path / "site" / "mergekit"
    (fake / "_data" / "chat_templates").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "_data" / "chat_templates" / "chatml.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]"
                                                                    "{% endfor %}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder = run(tmp_path, text)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    with pytest.raises(RecipeError, match=r"out2\.yml:4:.*'nosuch' is not a template"):
        run(tmp_path, text.replace("chatml", "nosuch"), "out2")


@pytest.mark.parametrize("tail,line,words", [
    ("tokenizer_source: {m}/missing\n", 6, "no folder"),
    ("tokenizer:\n  source: union\n  tokens:\n    <x>:\n      source: {{kind: model_token, model: {m}/b, "
     "token: nope}}\n", 9, "'nope' is not in the tokenizer"),
    ("tokenizer:\n  source: union\n  tokens:\n    <x>:\n      source: elsewhere\n", 9,
     "model 'elsewhere', which is not one"),
    ("tokenizer:\n  source: union\n  tokens:\n    <w>: {{source: {{kind: zeros}}}}\n", 9, "a token's source"),
    ("tokenizer:\n  source: union\n  tokenz: {{}}\n", 8, "unknown key 'tokenz'"),
    ("tokenizer_source: union\ntokenizer: {{source: base}}\n", 7, "not both"),
])
def test_bad_tokenizer_settings_name_the_line(tmp_path, vocab_models, tail, line, words):
    root = os.path.dirname(vocab_models["base"])
    text = (f"merge_method: linear\nmodels:\n  - model: {root}/base\n    parameters: {{weight: 1}}\n"
            f"  - model: {root}/b\n" + tail.format(m=root))
    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(RecipeError) as err:
        mecha.load_recipe(str(tmp_path / "bad.yml"))
    message = str(err.value)
    assert "\n" not in message and words in message and f"bad.yml:{line}:" in message, message


def test_an_unreadable_tokenizer_is_named(tmp_path, vocab_models):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(vocab_models["b"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    (tmp_path / "bad.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {vocab_models['base']}\n"
                                      f"  - model: {broken}\ntokenizer_source: union\n")
    with pytest.raises(RecipeError, match=r"bad\.yml:4:.*tokenizer of model .*broken' cannot be read"):
        mecha.load_recipe(str(tmp_path / "bad.yml"))


def test_import_prints_a_recipe_that_merges_to_the_same_bytes(tmp_path, vocab_models):
    m = vocab_models
    text = (f"merge_method: ties\nbase_model: {m['base']}\nparameters: {{density: 0.5, weight: 1}}\n"
            f"tokenizer_source: union\nmodels:\n  - model: {m['b']}\n  - model: {m['c']}\n")
    (tmp_path / "c.yml").write_text(text)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "mecha_core", "recipe", "import", str(tmp_path / "c.yml")],
                          capture_output=True, text=True, cwd=tmp_path, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "vocab=" in done.stdout
    (tmp_path / "c.mecha").write_text(done.stdout)
    from_yaml = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "y") + "/")
    from_mecha = mecha.merge(str(tmp_path / "c.mecha"), str(tmp_path / "m") + "/")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        yaml_bytes, mecha_bytes = (open(os.path.join(f, name), "rb").read() for f in (from_yaml, from_mecha))
        assert yaml_bytes == mecha_bytes, (name, yaml_bytes[:600], mecha_bytes[:600])
    assert weights(from_yaml)[EMBED].shape[0] == 25


def test_configs_listing_the_models_in_another_order_get_their_own_maps(tmp_path, vocab_models):
    m = vocab_models

    def text(order):
        weight = {"base": 1, "b": 3}
        return (f"merge_method: linear\nbase_model: {m['base']}\ntokenizer_source: union\nmodels:\n" +
                "".join(f"  - model: {m[n]}\n    parameters: {{weight: {weight[n]}}}\n" for n in order))

    # the same maps either way (a cache folder named by its contents), under other file names
    first, second = run(tmp_path, text(["base", "b"]), "one"), run(tmp_path, text(["b", "base"]), "two")
    vocab = transformers.AutoTokenizer.from_pretrained(first).get_vocab()
    rows = expected_rows(EMBED, vocab, {"base": m["base"], "b": m["b"]}, "base")
    for folder in (first, second):
        torch.testing.assert_close(weights(folder)[EMBED], linear(rows, {"base": 1, "b": 3}), rtol=1e-6, atol=1e-7)
