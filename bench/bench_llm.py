"""Benchmark: mecha vs mergekit 0.1.5 on Llama-shaped bf16 language models.

Builds three Llama-shaped models (random bf16 weights, ~1.5 GB each: hidden 2048, 12 layers,
vocabulary 32000) once into a work folder, each as a Hugging Face folder (config.json +
model.safetensors), then runs each merge in a fresh process and samples its private memory
(RssAnon + RssShmem from /proc/PID/status). Each run is preceded by a read of its inputs, so the
page cache is warm for every contender alike. One run per case; prints a table.

Cases: ``linear`` (the mean of the three models; mergekit ``linear`` with equal weights) and
``ties`` (model 0 as the base, the two others trimmed to density 0.5, sign elected by sum,
weights 1; mergekit ``ties`` with its default ``normalize: true``, the disjoint mean; mecha
``ties(base, a, b, density=0.5)``).
``--7b`` adds a 7B-shaped merge (the Llama-2-7B layout: hidden 4096, 32 layers, intermediate
11008; two bf16 models written as 5 GB shards with model.safetensors.index.json, ~13.5 GB each,
~45 GB of disk with the output). Both tools read the model folders and write a sharded folder.

mergekit lives in its own virtual environment (it pins its own dependencies), made once so pip
never resolves torch (a plain ``pip install mergekit`` pulls gigabytes of CUDA wheels):

    python -m venv /tmp/mergekit-venv
    /tmp/mergekit-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    echo torch==2.13.0 > /tmp/mergekit-constraints.txt
    /tmp/mergekit-venv/bin/pip install -c /tmp/mergekit-constraints.txt mergekit==0.1.5

Then:

    python bench/bench_llm.py [--work DIR] [--mergekit /tmp/mergekit-venv/bin/mergekit-yaml]
                              [--only linear,ties] [--contenders mecha,mergekit] [--shape small] [--7b]
                              [--repeat N]

mergekit runs with its default options (``mergekit-yaml CONFIG OUT``: CPU, lazy unpickle off,
its default shard size). mecha runs with its defaults too. Targets (issue 16): mecha at most 0.3x
mergekit's wall time and 0.2x its peak private memory; the 7B merge at most 1 GB private memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: model shapes: (hidden, layers, intermediate, heads, kv heads, vocabulary)
SHAPES = {
    "tiny": (64, 2, 128, 4, 4, 1000),  # --shape tiny: a smoke test of the script itself
    "small": (2048, 12, 5504, 16, 16, 32000),
    "7b": (4096, 32, 11008, 32, 32, 32000),
}
SHARD_BYTES = 5 * 1000 ** 3  # save_pretrained's default max_shard_size


def llama_config(shape: str) -> dict:
    hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_keys(shape: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape, in the order save_pretrained writes them (sorted)."""
    hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    keys = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return dict(sorted(keys.items()))


def build_model(folder: str, shape: str, seed: int) -> str:
    """A Llama-shaped bf16 model folder (shards of at most 5 GB, an index when there are several).

    Each shard is streamed to disk one tensor at a time (header first), so building a 7B-shaped
    model holds one tensor in memory, not a 5 GB shard and its serialised copy."""
    import torch

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    part = folder + ".part"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, dims in llama_keys(shape).items():
        nbytes = 2 * math.prod(dims)
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = dims
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        position = 0
        for key, dims in keys.items():
            nbytes = 2 * math.prod(dims)
            header[key] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [position, position + nbytes]}
            position += nbytes
            weight_map[key] = name
        total += position
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(part, name), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key, dims in keys.items():
                values = torch.randn(dims, generator=gen).mul_(0.02)
                if key.endswith("norm.weight"):
                    values.add_(1.0)
                f.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                del values
    if len(shards) > 1:
        with open(os.path.join(part, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(part, "config.json"), "w") as f:
        json.dump(llama_config(shape), f, indent=2)
    os.replace(part, folder)
    print(f"built {folder}", file=sys.stderr)
    return folder


def mecha_recipe(kind: str, folders: list[str]) -> str:
    """The merge as a .mecha recipe, run with ``mecha merge`` as a user would."""
    lines = ["mecha 1"] + [f"m{i} = model({json.dumps(f)})" for i, f in enumerate(folders)]
    names = ", ".join(f"m{i}" for i in range(len(folders)))
    if kind == "linear":
        lines.append(f"n_average({names})")
    else:
        lines.append(f'ties({names}, density=0.5, alpha=1.0, vote="sum")')
    return "\n".join(lines) + "\n"


def mergekit_config(kind: str, folders: list[str]) -> str:
    if kind == "linear":
        lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
        for f in folders:
            lines += [f"  - model: {f}", "    parameters:", "      weight: 1.0"]
        return "\n".join(lines) + "\n"
    lines = ["merge_method: ties", f"base_model: {folders[0]}", "dtype: bfloat16", "models:"]
    for f in folders[1:]:
        lines += [f"  - model: {f}", "    parameters:", "      density: 0.5", "      weight: 1.0"]
    return "\n".join(lines) + "\n"


#: every process runs with Python's bytecode cache, as installed packages do: with
#: PYTHONDONTWRITEBYTECODE set (some sandboxes set it), an editable install compiles its modules
#: from source on every start, which a pip-installed tool never does
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

def private_kb(pid: int) -> int:
    """The process's RssAnon + RssShmem in kB (0 once it has exited)."""
    from mecha_core.testing import private_bytes

    try:
        return private_bytes(pid) // 1024
    except OSError:
        return 0


def tree_private_kb(pid: int) -> int:
    """The process's private memory plus its children's (mergekit may spawn workers)."""
    total = private_kb(pid)
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        children = []
    return total + sum(tree_private_kb(int(c)) for c in children)


def warm(paths: list[str]) -> None:
    for path in paths:
        files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)
                                                      if n.endswith(".safetensors")]
        for file in files:
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def run(command: list[str], inputs: list[str]) -> tuple[float, float]:
    from mecha_core.testing import settle_memory

    warm(inputs)
    settle_memory()  # a virtual machine's free page reporting, after the last run's frees, on our CPUs
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_private_kb(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode(errors="replace")[-2000:])
    return wall, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(HERE, "out_llm"))
    parser.add_argument("--mergekit", default="/tmp/mergekit-venv/bin/mergekit-yaml",
                        help="the mergekit-yaml of mergekit's own venv (see above)")
    parser.add_argument("--only", default="linear,ties")
    parser.add_argument("--contenders", default="mecha,mergekit")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each row; the table gives the median wall time and the largest peak")
    parser.add_argument("--shape", default="small", choices=["tiny", "small"], help="the three models' shape")
    parser.add_argument("--7b", dest="seven", action="store_true", help="add the 7B-shaped case (~45 GB of disk)")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    wanted = [c for c in args.contenders.split(",") if c]
    if "mergekit" in wanted and not os.path.exists(args.mergekit):
        print(f"{args.mergekit} not found: mergekit is left out (see --help to install it)", file=sys.stderr)
        wanted.remove("mergekit")
    cases = [(kind, args.shape, 3) for kind in args.only.split(",") if kind]
    if args.seven:
        cases.append(("linear", "7b", 2))
    rows = []
    for kind, shape, count in cases:
        folders = [build_model(os.path.join(args.work, f"{shape}_{i}"), shape, 1000 + i) for i in range(count)]
        title = f"{kind} of {count} ({shape})"
        for who in wanted:
            out = os.path.join(args.work, f"out_{who}_{kind}_{shape}")
            shutil.rmtree(out, ignore_errors=True)
            if who == "mecha":
                inputs = folders
                recipe = os.path.join(args.work, f"{kind}_{shape}.mecha")
                with open(recipe, "w") as f:
                    f.write(mecha_recipe(kind, folders))
                # a folder output: shards, index, and the first model's config files
                command = [sys.executable, "-m", "mecha_core", "merge", recipe, "-o", out + "/"]
            else:
                config = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False, dir=args.work)
                config.write(mergekit_config(kind, folders))
                config.close()
                inputs = folders
                command = [args.mergekit, config.name, out]
            try:
                walls, peaks = [], []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    wall, peak = run(command, inputs)
                    walls.append(wall)
                    peaks.append(peak)
                rows.append((title, who, f"{statistics.median(walls):.1f}", f"{max(peaks):.0f}"))
                if args.repeat > 1:
                    print(f"{title} | {who}: runs {', '.join(f'{w:.1f}' for w in walls)} s", file=sys.stderr)
            except RuntimeError as exc:
                rows.append((title, who, "failed", " ".join(str(exc).split())[:60]))
            shutil.rmtree(out, ignore_errors=True)
            print(f"{title:<24} {who:<9} {rows[-1][2]:>8} s {rows[-1][3]:>8} MB", file=sys.stderr)
    print("| merge | tool | wall time (s) | peak private memory (MB) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    main()
