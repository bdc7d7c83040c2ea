"""Compatibility bench: mergekit 0.1.5 and mecha (mecha-mergekit) run the same mergekit configs on
the same small Llama-shaped models, and the outputs are compared tensor by tensor.

Per case it prints the max absolute and relative difference over every tensor (deterministic
methods; target ≤ 1e-6 relative, both computing in float32: every config says ``dtype: float32``)
or, for the random methods (dare_*, della*: mergekit draws from torch's global generator, mecha
from a per-key seed), the kept fraction of the change and its L2 norm for each tool (target:
equal within 1 %), plus each tool's wall time and peak private memory (RssAnon + RssShmem
sampled from /proc/PID/status).

mergekit lives in its own virtual environment, made so pip never resolves torch: the venv sees
the system site-packages (torch 2.13.0, transformers, pydantic, accelerate ...) and mergekit
and its two missing pure-Python dependencies are installed with --no-deps:

    python -m venv --system-site-packages /tmp/mergekit-venv
    /tmp/mergekit-venv/bin/pip install --no-deps mergekit==0.1.5 "immutables>=0.21,<1" "peft>=0.18"

Then, from the repository root:

    .venv/bin/python bench/mergekit_compat.py [--mergekit /tmp/mergekit-venv/bin/mergekit-yaml]
                                              [--work DIR] [--only ties,slerp]

The ``tok_*`` cases (tokenizer_source, the tokenizer section, chat_template) also compare the
output's tokenizer files byte for byte and config.json's vocab_size. mecha reads mergekit's
builtin chat templates (``chatml`` ...) from a ``mergekit`` package on its path: the bench runs
mecha with a PYTHONPATH folder holding a link to the mergekit venv's package.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = 4
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")

CASES = {
    "linear": """merge_method: linear
models:
  - {model: a, parameters: {weight: [1, 0.2]}}
  - {model: b, parameters: {weight: [{filter: mlp, value: 0.3}, {value: 1}]}}""",
    "linear_base": """merge_method: linear
base_model: base
parameters: {weight: 0.5, normalize: false}
models:
  - {model: a, parameters: {weight: 0.7}}""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: base
parameters: {lambda: 1.2}
models:
  - {model: a, parameters: {weight: 0.6}}
  - {model: b, parameters: {weight: [0.2, 0.8]}}""",
    "ties": """merge_method: ties
base_model: base
parameters: {density: 0.5}
models:
  - {model: a, parameters: {weight: 1, density: [0.3, 0.9]}}
  - {model: b, parameters: {weight: 0.5}}
  - {model: c, parameters: {weight: -0.3, density: [{filter: self_attn, value: 0.2}, {value: 0.6}]}}""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.8, gamma: 0.05}}
  - {model: b, parameters: {weight: 0.5, density: 0.7}}""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.8, gamma: 0.05}}
  - {model: b, parameters: {weight: 0.5, density: 0.7}}""",
    "slerp": """merge_method: slerp
base_model: a
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - {value: 0.5}
models:
  - {model: a}
  - {model: b}""",
    "nuslerp": """merge_method: nuslerp
base_model: base
models:
  - {model: a, parameters: {weight: 1}}
  - {model: b, parameters: {weight: 3}}""",
    "multislerp": """merge_method: multislerp
base_model: base
models:
  - {model: a, parameters: {weight: 1}}
  - {model: b, parameters: {weight: 2}}
  - {model: c, parameters: {weight: 1}}""",
    "karcher": """merge_method: karcher
models:
  - {model: a}
  - {model: b}
  - {model: c}""",
    "model_stock": """merge_method: model_stock
base_model: base
models:
  - {model: a}
  - {model: b}
  - {model: c}""",
    "sce": """merge_method: sce
base_model: base
parameters: {select_topk: 0.5}
models:
  - {model: a}
  - {model: b}
  - {model: c}""",
    "nearswap": """merge_method: nearswap
base_model: base
parameters: {t: 0.02}
models:
  - {model: b}""",
    "arcee_fusion": """merge_method: arcee_fusion
base_model: base
models:
  - {model: base}
  - {model: b}""",
    "passthrough": """merge_method: passthrough
models:
  - {model: a, parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1}]}}""",
    # a PEFT adapter merged into the base first (mergekit: PEFT's merge_and_unload into its LoRA
    # cache; mecha: apply_lora as the merge streams)
    "base_lora": """merge_method: task_arithmetic
base_model: base
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: base+lora, parameters: {weight: 1}}""",
    "dare_ties": """merge_method: dare_ties
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.5}}
  - {model: b, parameters: {weight: 0.5, density: 0.3}}""",
    "dare_linear": """merge_method: dare_linear
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.5}}
  - {model: b, parameters: {weight: 0.5, density: 0.3}}""",
    "della": """merge_method: della
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.5}}
  - {model: b, parameters: {weight: 0.5, density: 0.4}}""",
    "della_linear": """merge_method: della_linear
base_model: base
models:
  - {model: a, parameters: {weight: 1, density: 0.5, epsilon: 0.1}}
  - {model: b, parameters: {weight: 0.5, density: 0.4}}""",
    "slices_stack": """merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: b, layer_range: [1, 4], parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1}]}}]
  - sources: [{model: c, layer_range: [2, 4]}]""",
    "slices_slerp": """merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 4]}
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - {value: 0.5}""",
    "slices_modules": """merge_method: task_arithmetic
base_model: base
parameters: {lambda: 0.9}
modules:
  default:
    parameters: {weight: 0.5}
    slices:
      - sources:
          - {model: base, layer_range: [0, 2]}
          - {model: a, layer_range: [1, 3], parameters: {weight: [0.2, 1]}}
        parameters: {lambda: 1.1}
      - sources:
          - {model: base, layer_range: [2, 4]}
          - {model: b, layer_range: [2, 4]}""",
}

# the whole-key methods again on bfloat16 models on a coarse grid (qbase + qa, qb, qc: a few
# hundred distinct deltas, so many entries share the magnitude at every top-k bound). mergekit
# upcasts them to float32 (dtype: float32) as mecha does, and both write bfloat16 (out_dtype; mecha
# writes the first input's dtype anyway); its top-k sorts are not stable, so where
# only some of the entries equal to a bound are kept, the two keep different ones (the count of
# entries that differ says how many)
TIED_CASES = {
    "ties_tied": """out_dtype: bfloat16
merge_method: ties
base_model: qbase
parameters: {density: 0.3}
models:
  - {model: qa, parameters: {weight: 1}}
  - {model: qb, parameters: {weight: 0.5, density: 0.55}}
  - {model: qc, parameters: {weight: -0.3}}""",
    "breadcrumbs_tied": """out_dtype: bfloat16
merge_method: breadcrumbs
base_model: qbase
models:
  - {model: qa, parameters: {weight: 1, density: 0.6, gamma: 0.1}}
  - {model: qb, parameters: {weight: 0.5, density: 0.7}}""",
    "sce_tied": """out_dtype: bfloat16
merge_method: sce
base_model: qbase
parameters: {select_topk: 0.3}
models:
  - {model: qa}
  - {model: qb}
  - {model: qc}""",
    "model_stock_tied": """out_dtype: bfloat16
merge_method: model_stock
base_model: qbase
models:
  - {model: qa}
  - {model: qb}
  - {model: qc}""",
    "multislerp_tied": """out_dtype: bfloat16
merge_method: multislerp
base_model: qbase
models:
  - {model: qa, parameters: {weight: 1}}
  - {model: qb, parameters: {weight: 2}}""",
    "karcher_tied": """out_dtype: bfloat16
merge_method: karcher
models:
  - {model: qa}
  - {model: qb}
  - {model: qc}""",
}

# mergekit's tokenizer settings, on three models whose vocabularies differ by added tokens
# (tbase: 400 words; ta: + <|im_start|> <|im_end|>, a chatml template; tb: + <|im_start|>
# <|im_end|> <tool>; tbase and tb share another template, so `auto` has a plurality); the
# tokenizer files are compared byte for byte too. mergekit visits the non-base models in a Python
# set's order (it varies between runs): ta's added tokens are a prefix of tb's, so the union's
# order is the same either way (mecha takes the config's order)
TOKENIZER_CASES = {
    "tok_union": """merge_method: linear
base_model: tbase
tokenizer_source: union
models:
  - {model: tbase, parameters: {weight: 1}}
  - {model: ta, parameters: {weight: 2}}
  - {model: tb, parameters: {weight: 0.5}}""",
    "tok_base": """merge_method: ties
base_model: tbase
tokenizer_source: base
parameters: {density: 0.6}
models:
  - {model: ta, parameters: {weight: 1}}
  - {model: tb, parameters: {weight: 0.7}}""",
    "tok_model": """merge_method: task_arithmetic
base_model: tbase
tokenizer_source: tb
models:
  - {model: ta, parameters: {weight: 0.8}}
  - {model: tb, parameters: {weight: 0.4}}""",
    "tok_section": """merge_method: linear
base_model: tbase
chat_template: chatml
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>: {source: {kind: model_token, model: tbase, token: w7}}
    <tool>: {source: tb}
    w3: {source: {kind: zero}, force: true}
    <extra>: {source: {kind: model_token, model: tb, token_id: 5}}
models:
  - {model: tbase, parameters: {weight: 1}}
  - {model: ta, parameters: {weight: 1}}
  - {model: tb, parameters: {weight: 1}}""",
    "tok_chat_auto": """merge_method: linear
base_model: tbase
chat_template: auto
tokenizer_source: union
models:
  - {model: ta, parameters: {weight: 1}}
  - {model: tb, parameters: {weight: 1}}
  - {model: tbase, parameters: {weight: 1}}""",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_tokenizer_models(work: str) -> None:
    """tbase, ta, tb: float32 Llama folders, each with a WordLevel tokenizer of its own vocabulary."""
    import tokenizers
    import torch
    import transformers

    if os.path.exists(os.path.join(work, "tb", "model.safetensors")):
        return
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    plain = "{{ messages[0]['content'] }}!"
    for i, (name, added, template) in enumerate([("tbase", [], plain), ("ta", ["<|im_start|>", "<|im_end|>"], chatml),
                                                 ("tb", ["<|im_start|>", "<|im_end|>", "<tool>"], plain)]):
        vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{j}": j + 2 for j in range(400)}}
        core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
        tok.add_tokens(added, special_tokens=True)
        if template:
            tok.chat_template = template
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, tie_word_embeddings=False)
        torch.manual_seed(20 + i)
        transformers.LlamaForCausalLM(config).save_pretrained(os.path.join(work, name))
        tok.save_pretrained(os.path.join(work, name))


def compare_tokenizers(mk_out: str, mecha_out: str) -> str:
    import json

    def read(out: str, name: str) -> bytes | None:
        path = os.path.join(out, name)
        return open(path, "rb").read() if os.path.exists(path) else None

    differ = [name for name in TOKENIZER_FILES if read(mk_out, name) != read(mecha_out, name)]
    sizes = [json.load(open(os.path.join(out, "config.json")))["vocab_size"] for out in (mk_out, mecha_out)]
    same = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(mk_out, n)) and n not in differ]
    vocab = f"vocab_size {sizes[0]}" if sizes[0] == sizes[1] else f"vocab_size mergekit {sizes[0]} mecha {sizes[1]}"
    return (f"; {vocab}; tokenizer files identical ({', '.join(same)})" if not differ
            else f"; {vocab}; tokenizer files DIFFER: {', '.join(differ)}")


def build_models(work: str) -> None:
    """A base and three fine-tunes (the base plus random deltas), float32 Hugging Face folders."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    if os.path.exists(os.path.join(work, "c", "model.safetensors")):
        return
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(os.path.join(work, "base"))
    base = load_file(os.path.join(work, "base", "model.safetensors"))
    for i, name in enumerate("abc"):
        folder = os.path.join(work, name)
        shutil.copytree(os.path.join(work, "base"), folder)
        gen = torch.Generator().manual_seed(10 + i)
        save_file({k: (v + torch.randn(v.shape, generator=gen) * 0.01 * (i + 1)).contiguous() for k, v in base.items()},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_tied_models(work: str) -> None:
    """qbase and qa, qb, qc: bfloat16 folders whose weights and deltas lie on coarse grids."""
    import torch
    from safetensors.torch import load_file, save_file

    if os.path.exists(os.path.join(work, "qc", "model.safetensors")):
        return
    base = load_file(os.path.join(work, "base", "model.safetensors"))
    gen = torch.Generator().manual_seed(30)
    grid = {k: (torch.round(v * 64) / 64).to(torch.bfloat16) for k, v in base.items()}
    for i, name in enumerate(["qbase", "qa", "qb", "qc"]):
        folder = os.path.join(work, name)
        shutil.copytree(os.path.join(work, "base"), folder)
        tensors = grid if i == 0 else {
            k: (v.float() + torch.randint(-6, 7, v.shape, generator=gen) / 256 * i).to(torch.bfloat16).contiguous()
            for k, v in grid.items()}
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_adapter(work: str) -> None:
    """A PEFT adapter folder of the base, in PEFT's layout: rank 8 LoRA on every linear layer
    (layer 1's q_proj with its own alpha), lm_head in modules_to_save."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    folder = os.path.join(work, "lora")
    if os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    base = load_file(os.path.join(work, "base", "model.safetensors"))
    gen = torch.Generator().manual_seed(20)
    tensors = {}
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if module.endswith(("_proj",)):
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, weight.shape[1], generator=gen) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(weight.shape[0], 8, generator=gen) * 0.05
    tensors["base_model.model.lm_head.weight"] = base["lm_head.weight"] * 1.01
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
              "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 4}, "rank_pattern": {},
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "modules_to_save": ["lm_head"], "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "lora_dropout": 0.0, "bias": "none", "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def private_peak(cmd: list[str], cwd: str, extra_env: dict | None = None) -> tuple[float, int, int]:
    """(seconds, peak RssAnon + RssShmem in bytes, exit code) of ``cmd``."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                kb = sum(int(fields.get(f, "0 kB").split()[0]) for f in ("RssAnon", "RssShmem"))
                peak[0] = max(peak[0], kb * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return time.perf_counter() - start, peak[0], proc.returncode


def load_folder(folder: str) -> dict:
    import json

    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def compare(case: str, work: str, mk_out: str, mecha_out: str) -> str:
    mk, me = load_folder(mk_out), load_folder(mecha_out)
    if set(mk) != set(me):
        only_mk, only_me = sorted(set(mk) - set(me))[:3], sorted(set(me) - set(mk))[:3]
        return f"key sets differ: only mergekit {only_mk}, only mecha {only_me}"
    if case in RANDOM:
        base = load_folder(os.path.join(work, "base"))
        stats = []
        for out in (mk, me):
            kept = sum(int((out[k].float() != base[k].float()).sum()) for k in base)
            total = sum(base[k].numel() for k in base)
            l2 = sum(float(((out[k].float() - base[k].float()) ** 2).sum()) for k in base) ** 0.5
            stats.append((kept / total, l2))
        (fk, lk), (fm, lm) = stats
        return (f"kept mergekit {fk:.4f} mecha {fm:.4f} ({abs(fm - fk) / fk:.2%}); "
                f"L2 mergekit {lk:.4f} mecha {lm:.4f} ({abs(lm - lk) / lk:.2%})")
    abs_diff = rel_diff = 0.0
    differ = total = 0
    for key in mk:
        a, b = mk[key].double(), me[key].double()
        diff = (a - b).abs()
        abs_diff = max(abs_diff, float(diff.max()))
        rel_diff = max(rel_diff, float(diff.max() / a.abs().max().clamp(min=1e-12)))
        differ += int((diff > 0).sum())
        total += diff.numel()
    return f"max abs {abs_diff:.3g}, max rel {rel_diff:.3g}, {differ}/{total} entries differ"


def same_bytes(first: str, second: str) -> bool:
    """Whether two output folders hold the same tensors, bit for bit."""
    import torch

    a, b = load_folder(first), load_folder(second)
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(
        a[k].contiguous().view(-1).view(torch.uint8), b[k].contiguous().view(-1).view(torch.uint8)) for k in a)


#: mergekit methods mecha runs in statistics passes over slices: each case runs mecha a second
#: time with 4096-element slices (every key of these models is cut in up to 16) and checks the bytes
SLICED = {"ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear", "della", "della_linear", "sce",
          "model_stock", "nuslerp", "multislerp", "karcher", "arcee_fusion"}
_SLICED_RUN = ("import sys, mecha_core as m; m.merge(sys.argv[1], sys.argv[2] + '/', chunk_elements=4096, "
               "threads=2, models_dir=sys.argv[3])")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit", default="/tmp/mergekit-venv/bin/mergekit-yaml")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mecha-mergekit-compat"))
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    build_models(args.work)
    build_adapter(args.work)
    build_tokenizer_models(args.work)
    build_tied_models(args.work)
    mecha = os.path.join(os.path.dirname(sys.executable), "mecha")
    every = {**CASES, **TIED_CASES, **TOKENIZER_CASES}
    # mecha finds mergekit's chat templates in a mergekit package on its path (not imported)
    templates = os.path.join(args.work, "mergekit-path")
    package = glob.glob(os.path.join(os.path.dirname(os.path.dirname(args.mergekit)), "lib", "python3*",
                                     "site-packages", "mergekit"))
    if package and not os.path.exists(os.path.join(templates, "mergekit")):
        os.makedirs(templates, exist_ok=True)
        os.symlink(package[0], os.path.join(templates, "mergekit"))
    mecha_env = {"PYTHONPATH": templates, "XDG_CACHE_HOME": os.path.join(args.work, "cache")}
    cases = [c for c in every if not args.only or c in args.only.split(",")]
    print(f"{'case':18} {'mergekit s':>10} {'MB':>6} {'mecha s':>8} {'MB':>6}  difference")
    for case in cases:
        config = os.path.join(args.work, f"{case}.yml")
        with open(config, "w") as fh:
            # absolute folders: mergekit takes a name it cannot open as a hub id
            text = re.sub(r"(model: )(base|a|b|c|tbase|ta|tb|qbase|qa|qb|qc)\b"
                          r"|((?:source|tokenizer_source): )(tbase|ta|tb)\b",
                          lambda m: (m.group(1) or m.group(3)) + os.path.join(args.work, m.group(2) or m.group(4)),
                          every[case])
            text = text.replace("+lora", "+" + os.path.join(args.work, "lora"))
            fh.write(text + "\ndtype: float32\n")
        mk_out, mecha_out = os.path.join(args.work, f"out-mk-{case}"), os.path.join(args.work, f"out-mecha-{case}")
        for out in (mk_out, mecha_out):
            shutil.rmtree(out, ignore_errors=True)
        lora_cache = os.path.join(args.work, "lora-merge-cache")  # mergekit merges each LoRA anew
        shutil.rmtree(lora_cache, ignore_errors=True)
        mk_time, mk_mem, mk_rc = private_peak([args.mergekit, config, mk_out, "--random-seed", "0",
                                               "--lora-merge-cache", lora_cache], args.work)
        me_time, me_mem, me_rc = private_peak([mecha, "merge", config, "-o", mecha_out + "/", "-q"], args.work,
                                              mecha_env)
        if mk_rc or me_rc:
            print(f"{case:18} failed (mergekit rc {mk_rc}, mecha rc {me_rc})")
            continue
        sliced = ""
        method = re.search(r"merge_method: (\w+)", every[case])
        if method and method.group(1) in SLICED:
            sliced_out = mecha_out + "-sliced"
            shutil.rmtree(sliced_out, ignore_errors=True)
            done = subprocess.run([sys.executable, "-c", _SLICED_RUN, config, sliced_out, args.work], cwd=args.work,
                                  env={**os.environ, **mecha_env, "HF_HUB_OFFLINE": "1"}, capture_output=True)
            sliced = ("; sliced: FAILED " + done.stderr.decode(errors="replace")[-300:] if done.returncode else
                      "; sliced: same bytes" if same_bytes(mecha_out, sliced_out) else "; sliced: bytes DIFFER")
        print(f"{case:18} {mk_time:10.2f} {mk_mem / 2**20:6.0f} {me_time:8.2f} {me_mem / 2**20:6.0f}  "
              f"{compare(case, args.work, mk_out, mecha_out)}{sliced}"
              f"{compare_tokenizers(mk_out, mecha_out) if case in TOKENIZER_CASES else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
