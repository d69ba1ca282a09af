"""Throughput and peak memory of each conversion direction on a synthetic ~1B-parameter Llama (bf16),
side by side with `cp -r` of the same files in the same run (the physical floor on this machine).

Run: python scripts/benchmark.py [work folder] [--max-queue-size N]   (needs psutil: pip install -e '.[test]')
Prints a markdown table; docs/performance.md records a run.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              torch_dtype="bfloat16", hidden_act="silu")


def make_model(folder):
    """Random bf16 weights written one shard per 4 layers, so making them never holds the whole model."""
    folder.mkdir(parents=True)
    c = CONFIG
    hidden, ffn, head_dim = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": tensor(c["vocab_size"], hidden)}]
    for i in range(c["num_hidden_layers"]):
        if i % 4 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({p + "input_layernorm.weight": tensor(hidden), p + "post_attention_layernorm.weight": tensor(hidden),
                           p + "self_attn.q_proj.weight": tensor(hidden, hidden), p + "self_attn.k_proj.weight": tensor(kv, hidden),
                           p + "self_attn.v_proj.weight": tensor(kv, hidden), p + "self_attn.o_proj.weight": tensor(hidden, hidden),
                           p + "mlp.gate_proj.weight": tensor(ffn, hidden), p + "mlp.up_proj.weight": tensor(ffn, hidden),
                           p + "mlp.down_proj.weight": tensor(hidden, ffn)})
    shards.append({"model.norm.weight": tensor(hidden), "lm_head.weight": tensor(c["vocab_size"], hidden)})
    weight_map, count = {}, len(shards)
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def warm(folder):
    """Read the source once so every measurement starts from the page cache, as cp does after the first."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def memory(process):
    """(private, shared memory, resident) bytes of a process. Private is Private_Dirty: memory this
    process wrote and nobody else maps, i.e. its own heap. Neither the torch pages the forked loader
    and saver share with their parent, nor clean pages of a memory-mapped source file (which RSS and
    USS both count, though the kernel can drop them at will) are in it."""
    fields = {}
    with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    with open(f"/proc/{process.pid}/status") as status:
        shmem = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssShmem:"))
    return fields["Private_Dirty"], shmem, fields["Rss"]


def measure(command):
    """(seconds, peak private memory summed over the processes, peak shared memory of one process,
    peak RSS summed over the processes), in bytes."""
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    private = shared = resident = 0
    while process.poll() is None:
        try:
            sizes = [memory(p) for p in [process] + process.children(recursive=True)]
        except (psutil.Error, OSError, StopIteration, KeyError):
            continue
        private = max(private, sum(s[0] for s in sizes))
        shared = max(shared, max(s[1] for s in sizes))
        resident = max(resident, sum(s[2] for s in sizes))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()[-2000:]}")
    return seconds, private, shared, resident


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work", nargs="?", default=None)
    parser.add_argument("--max-queue-size", type=int, default=2)
    options = parser.parse_args()
    work = Path(options.work or tempfile.mkdtemp(prefix="converter-core-bench-"))
    source = work / "hf"
    if not source.exists():
        make_model(source)
    convert = [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--max-queue-size", str(options.max_queue_size)]
    runs = [
        ("HF -> mcore torch (TP2 PP2)", source, work / "mcore", ["--loader", "llama_hf", "--saver", "mcore",
                                                                  "--target-tensor-parallel-size", "2",
                                                                  "--target-pipeline-parallel-size", "2"]),
        ("mcore torch -> HF", work / "mcore", work / "hf-back", ["--loader", "mcore", "--saver", "llama_hf"]),
        ("mcore torch -> mcore torch (TP1 PP1)", work / "mcore", work / "mcore-tp1",
         ["--loader", "mcore", "--saver", "mcore", "--target-tensor-parallel-size", "1",
          "--target-pipeline-parallel-size", "1"]),
        ("HF -> torch_dist", source, work / "dist", ["--loader", "llama_hf", "--saver", "mcore", "--ckpt-format", "torch_dist"]),
        ("torch_dist -> HF", work / "dist", work / "hf-from-dist", ["--loader", "mcore", "--saver", "llama_hf"]),
    ]
    model_bytes = folder_bytes(source)
    print(f"model: {model_bytes / 1e9:.2f} GB of bf16 safetensors ({model_bytes // 2 / 1e9:.2f} B parameters), "
          f"--max-queue-size {options.max_queue_size}, {psutil.cpu_count()} CPUs\n")
    print("| direction | read GB | seconds | GB/s | `cp -r` seconds | time / cp | peak private memory (Private_Dirty, summed) | peak shared memory (queue) | peak RSS, summed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, load, save, flags in runs:
        for folder in (save, work / "copy"):
            shutil.rmtree(folder, ignore_errors=True)
        warm(load)
        copy_seconds = measure(["cp", "-r", str(load), str(work / "copy")])[0]
        seconds, private, shared, resident = measure(convert + ["--load-dir", str(load), "--save-dir", str(save)] + flags)
        size = folder_bytes(load)
        print(f"| {name} | {size / 1e9:.2f} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | {copy_seconds:.1f} | "
              f"{seconds / copy_seconds:.1f}x | {private / 2**30:.2f} GiB | {shared / 2**30:.2f} GiB | "
              f"{resident / 2**30:.2f} GiB |", flush=True)
    shutil.rmtree(work / "copy", ignore_errors=True)


if __name__ == "__main__":
    main()
