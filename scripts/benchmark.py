"""Throughput, cores used and peak memory of each conversion direction on a synthetic bf16 Llama, side by
side with `cp -r` of the same files in the same run (the physical floor on this machine), and with
`cp -r` + `sync`, the floor for our savers, which fsync what they write (each the best of three runs).
Each conversion is timed the same way (best of three), then run once more with the memory probe, which
needs CPU time of its own. Start-up is the time until the converter reports its start (Python, torch and
our imports, reading the source's metadata: no tensor has moved yet, and it runs on one core), so that the
cores used by the conversion proper can be told apart from it.

With --dry-run, each direction whose source is there is timed as a --dry-run instead (best of three; it reads
headers only and writes nothing, which is checked), beside the plan's files and bytes.

Run: python scripts/benchmark.py [work folder] [--preset 0.9b|8b] [--layers N] [--hidden N] [--ffn N]
     [--heads N] [--kv-heads N] [--vocab N] [--workers N] [--max-queue-size N] [--only NAME ...]
     [--dry-run | --processes K [K ...]] [--dry-run]
(needs psutil: pip install -e '.[test]'). Prints a markdown table; docs/performance.md holds the current numbers, docs/performance-log.md the runs.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

# Shapes: the 0.89 B model of earlier runs, and Llama-3-8B's widths (vocabulary 128256) with few layers.
PRESETS = {"0.9b": dict(hidden=2048, ffn=5632, heads=16, kv_heads=8, vocab=32000, layers=16),
           "8b": dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=4)}


def config_for(shape):
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=shape["hidden"],
                intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                torch_dtype="bfloat16", hidden_act="silu")


def make_model(folder, config):
    """Random bf16 weights written one shard per 4 layers, so making them never holds the whole model."""
    folder.mkdir(parents=True)
    c = config
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
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def largest_tensor_bytes(config):
    c = config
    return 2 * max(c["vocab_size"] * c["hidden_size"], c["intermediate_size"] * c["hidden_size"])


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


def watch_start(process, started, start):
    """Reads the converter's JSON events; at its "start" (the first message is about to be sent) records
    the time and the CPU time its processes have used so far into `start`."""
    for line in process.stdout:
        if not start and '"event": "start"' in line:
            try:
                used = sum(sum(p.cpu_times()[:2]) for p in [process] + process.children(recursive=True))
            except psutil.Error:
                continue
            start.extend((time.perf_counter() - started, used))


def measure(command, probe=False):
    """(seconds, CPU seconds, start-up seconds, start-up CPU seconds, peak private memory summed over the
    process tree, peak shared memory of one process, peak RSS summed), in seconds and bytes. CPU time comes
    from getrusage of the waited-for children, which includes the loader and saver the converter itself
    waits for. Memory is probed (every 20 ms through /proc) only with `probe`: the probe itself takes CPU
    time a 2-CPU machine lacks, so times are taken from a run without it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = []
    watcher = threading.Thread(target=watch_start, args=(process, started, start))
    watcher.start()
    private = shared = resident = 0
    if not probe:
        process.wait()
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    watcher.join()
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{process.stderr.read()[-2000:]}")
    return (seconds, cpu, *(start or (float("nan"), float("nan"))), private, shared, resident)


COPY_RUNS = 3
SCALE_OUT_SHARD = "1GB"  # HF shards of a --processes run: several per rank at the 8B shape
RUNS = {  # name: (source, target, flags), folders relative to the work folder
    "hf-mcore": ("HF -> mcore torch (TP2 PP2)", "hf", "mcore",
                 ["--loader", "llama_hf", "--saver", "mcore", "--target-tensor-parallel-size", "2",
                  "--target-pipeline-parallel-size", "2"]),
    "mcore-hf": ("mcore torch -> HF", "mcore", "hf-back", ["--loader", "mcore", "--saver", "llama_hf"]),
    "mcore-mcore": ("mcore torch -> mcore torch (TP1 PP1)", "mcore", "mcore-tp1",
                    ["--loader", "mcore", "--saver", "mcore", "--target-tensor-parallel-size", "1",
                     "--target-pipeline-parallel-size", "1"]),
    "hf-dist": ("HF -> torch_dist", "hf", "dist", ["--loader", "llama_hf", "--saver", "mcore", "--ckpt-format",
                                                   "torch_dist"]),
    "dist-hf": ("torch_dist -> HF", "dist", "hf-from-dist", ["--loader", "mcore", "--saver", "llama_hf"]),
}


def floor_seconds(load, work):
    """(cp -r + sync, cp -r) seconds for `load`, the best of COPY_RUNS from a warm page cache."""
    floors = []
    for _ in range(COPY_RUNS):
        os.sync()  # nothing earlier left to flush into the timed sync
        warm(load)
        copy = measure(["cp", "-r", str(load), str(work / "copy")])[0]
        floors.append((copy + measure(["sync"])[0], copy))
        shutil.rmtree(work / "copy", ignore_errors=True)
    return min(floors)


def parallel_floor_seconds(load, work, copies):
    """`copies` cp processes at once, each copying a share of `load`'s files balanced by bytes, then sync:
    the floor for a job split over that many processes (one cp -r is one writer; the disk may take more).
    The best of COPY_RUNS from a warm page cache."""
    shares, loads = [[] for _ in range(copies)], [0] * copies
    for path in sorted((p for p in load.rglob("*") if p.is_file()), key=lambda path: -path.stat().st_size):
        least = loads.index(min(loads))
        shares[least].append(str(path.relative_to(load)))
        loads[least] += path.stat().st_size
    runs = []
    for _ in range(COPY_RUNS):
        shutil.rmtree(work / "copy", ignore_errors=True)
        (work / "copy").mkdir()
        os.sync()
        warm(load)
        start = time.perf_counter()
        copying = [subprocess.Popen(["cp", "--parents", *share, str(work / "copy")], cwd=load)
                   for share in shares if share]
        if any(process.wait() for process in copying):
            sys.exit(f"cp of {load} failed")
        os.sync()
        runs.append(time.perf_counter() - start)
    shutil.rmtree(work / "copy", ignore_errors=True)
    return min(runs)


def best_run(command, save, load):
    """measure() of the conversion `command` into `save`, the best of COPY_RUNS, each from a clean start."""
    runs = []
    for _ in range(COPY_RUNS):
        shutil.rmtree(save, ignore_errors=True)
        os.sync()
        warm(load)
        runs.append(measure(command))
    return min(runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work", nargs="?", default=None)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.9b")
    for name in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=f"overrides the preset's {name}")
    parser.add_argument("--max-queue-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="passed to the converter (default: its own)")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="directions to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="time --dry-run of each direction instead")
    parser.add_argument("--processes", type=int, nargs="+", metavar="K",
                        help="time each direction with --processes K for each K given instead (scale-out)")
    options = parser.parse_args()
    shape = dict(PRESETS[options.preset])
    shape.update({k: v for k, v in (("layers", options.layers), ("hidden", options.hidden), ("ffn", options.ffn),
                                    ("heads", options.heads), ("kv_heads", options.kv_heads), ("vocab", options.vocab))
                  if v is not None})
    config = config_for(shape)
    work = Path(options.work or tempfile.mkdtemp(prefix="converter-core-bench-"))
    source = work / "hf"
    if source.exists() and json.loads((source / "config.json").read_text()) != config:
        shutil.rmtree(work)  # another shape's files: start over
    if not source.exists():
        make_model(source, config)
    convert = [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--progress", "json", "--max-queue-size",
               str(options.max_queue_size)] + (["--workers", str(options.workers)] if options.workers else [])
    model_bytes, largest = folder_bytes(source), largest_tensor_bytes(config)
    print(f"model: {model_bytes / 1e9:.2f} GB of bf16 safetensors ({model_bytes // 2 / 1e9:.2f} B parameters; "
          f"{shape}), largest tensor {largest / 2**30:.2f} GiB, memory goal 2 x largest + 0.5 GiB = "
          f"{(2 * largest + 2**29) / 2**30:.2f} GiB; --max-queue-size {options.max_queue_size}, "
          f"--workers {options.workers or 'default'}, {psutil.cpu_count()} CPUs\n")
    if options.dry_run:
        return dry_runs(work, convert, options.only or RUNS)
    if options.processes:
        return scaling_runs(work, convert, options.only or RUNS, options.processes)
    print("| direction | read GB | seconds | GB/s | `cp -r` s | time / cp | `cp -r` + `sync` s | time / (cp + sync) | "
          "CPU s / wall s | start-up s | CPU s / wall s after start-up | peak private (summed) | peak shared (queue) | "
          "peak RSS, summed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in options.only or RUNS:
        name, load, save, flags = RUNS[key]
        load, save = work / load, work / save
        for folder in (save, work / "copy"):
            shutil.rmtree(folder, ignore_errors=True)
        floor, copy_seconds = floor_seconds(load, work)  # the best of COPY_RUNS: cp's time varies with the cache
        command = convert + ["--load-dir", str(load), "--save-dir", str(save)] + flags
        seconds, cpu, start_seconds, start_cpu = best_run(command, save, load)[:4]  # measured as the floors
        shutil.rmtree(save)
        os.sync()
        warm(load)
        private, shared, resident = measure(command, probe=True)[4:]
        size = folder_bytes(load)
        print(f"| {name} | {size / 1e9:.2f} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | {copy_seconds:.1f} | "
              f"{seconds / copy_seconds:.1f}x | {floor:.1f} | {seconds / floor:.1f}x | {cpu / seconds:.2f} | "
              f"{start_seconds:.1f} | {(cpu - start_cpu) / (seconds - start_seconds):.2f} | "
              f"{private / 2**30:.2f} GiB | {shared / 2**30:.2f} GiB | {resident / 2**30:.2f} GiB |", flush=True)
    shutil.rmtree(work / "copy", ignore_errors=True)


def scaling_runs(work, convert, keys, counts):
    """Time each direction with --processes K for every K in `counts` (best of COPY_RUNS, as the conversions),
    beside cp -r + sync of its source and K cp processes + sync (parallel_floor_seconds); the speed-up is
    against the first K given. A direction whose source is another's output (mcore -> HF) needs that one
    run first, here or earlier. HF outputs are written in SCALE_OUT_SHARD shards at every K: ranks share
    whole files, and one 50GB-limit file would leave all ranks but one idle."""
    print("| direction | processes | read GB | seconds | GB/s | time / (cp + sync) | K cp + sync s | "
          "time / (K cp + sync) | speed-up | CPU s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        name, load, save, flags = RUNS[key]
        load, save = work / load, work / save
        if "llama_hf" in flags[flags.index("--saver") + 1:][:1]:
            name, flags = f"{name} (--max-shard-size {SCALE_OUT_SHARD})", flags + ["--max-shard-size", SCALE_OUT_SHARD]
        if not load.exists():
            print(f"| {name} | | (no source: run its source's direction first) | | | | | | | |")
            continue
        floor, _ = floor_seconds(load, work)
        size, first = folder_bytes(load), None
        for count in counts:
            command = convert + ["--load-dir", str(load), "--save-dir", str(save), "--processes", str(count)] + flags
            seconds, cpu = best_run(command, save, load)[:2]
            first = first or seconds
            parallel_floor = parallel_floor_seconds(load, work, count)
            print(f"| {name} | {count} | {size / 1e9:.2f} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | "
                  f"{seconds / floor:.1f}x | {parallel_floor:.1f} | {seconds / parallel_floor:.1f}x | "
                  f"{first / seconds:.2f}x | {cpu / seconds:.2f} |", flush=True)
    shutil.rmtree(work / "copy", ignore_errors=True)


def dry_runs(work, convert, keys):
    """Time --dry-run of each direction whose source exists (best of COPY_RUNS, as the conversions), into a
    folder beside the real output (SAVE-dry-run), which must not appear."""
    print("| direction | source GB | dry run s | planned files | planned GB to write | estimated s |")
    print("|---|---|---|---|---|---|")
    for key in keys:
        name, load, save, flags = RUNS[key]
        load, save = work / load, work / f"{save}-dry-run"
        if not load.exists():
            print(f"| {name} | (no source: run it for real first) | | | | |")
            continue
        command = convert + ["--load-dir", str(load), "--save-dir", str(save), "--dry-run"] + flags
        seconds = min(measure(command)[0] for _ in range(COPY_RUNS))
        plan = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        if save.exists():
            sys.exit(f"--dry-run wrote {save}")
        estimate = "no rate yet" if plan["estimated_seconds"] is None else f"{plan['estimated_seconds']:.0f}"
        print(f"| {name} | {folder_bytes(load) / 1e9:.2f} | {seconds:.1f} | {len(plan['files'])} | "
              f"{plan['bytes_written'] / 1e9:.2f} | {estimate} |", flush=True)


if __name__ == "__main__":
    main()
