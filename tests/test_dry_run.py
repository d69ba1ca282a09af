"""--dry-run / convert(dry_run=True): the plan lists exactly the files (names and sizes) the real run of the
same flags then writes, for per-rank files at TP 2 x PP 2, experts at EP 2, HF shards and torch_dist; nothing
is written meanwhile (no output, lock, staging or scratch left); the same checks refuse the same input; the
estimate uses the rate the last real run recorded; Megatron's own plugins are refused in one line."""

import json
import os
import subprocess
import sys

import pytest
import transformers
from safetensors import safe_open

import converter_core
from converter_core import dry_run
from helpers import BASE, convert, error_line, make_hf_model, randomize


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    make_hf_model(root / "hf", num_hidden_layers=4)
    return root / "hf"


def cli(*flags, env=None):
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def written(folder):
    """[(path relative to folder, size)] of every file under it, as the plan lists them."""
    return sorted((str(path.relative_to(folder)), path.stat().st_size) for path in folder.rglob("*") if path.is_file())


def planned(plan):
    return sorted((str(file.path), file.bytes) for file in plan.files)


def scratch_folders():
    return {name for name in os.listdir("/dev/shm") if name.startswith("converter_core-dry-run-")} \
        if os.path.isdir("/dev/shm") else set()


def test_rank_files_plan_is_the_real_output(source, tmp_path):
    target, env = tmp_path / "out" / "mcore", dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    flags = ["--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
             "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2]
    before = scratch_folders()
    shown = cli(*flags, "--dry-run", env=env)
    assert shown.returncode == 0, shown.stderr
    assert not (tmp_path / "out").exists() and scratch_folders() == before  # nothing written, nothing left
    event = json.loads(cli(*flags, "--dry-run", "--progress", "json", env=env).stdout.splitlines()[-1])
    assert event["event"] == "plan" and event["estimated_seconds"] is None and event["rate"] is None
    assert not (tmp_path / "out").exists()

    convert(*flags, env=env)
    files = written(target)
    assert sorted((file["path"], file["bytes"]) for file in event["files"]) == files
    assert len(files) == 5 and event["bytes_written"] == sum(size for _, size in files)
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:  # fp32 source, sent as stored
        assert event["bytes_read"] == sum(handle.get_tensor(name).nbytes for name in handle.keys())
    lines = shown.stdout.splitlines()
    assert lines[0] == "dry run, nothing written; a real run writes:"
    assert [line.split() for line in lines[1:6]] == [[name, f"{size:,}", "bytes"] for name, size in files]
    assert lines[-1].startswith("estimated time: no rate measured yet")

    again = cli(*flags, "--dry-run", env=env)  # the same checks as a real run: the iteration exists
    assert error_line(again) == error_line(cli(*flags, env=env)) == \
        f"converter_core: error: saver failed: {target}/iter_0000001: already exists; choose another --save-dir"


@pytest.fixture(scope="module")
def megatron(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp2pp2") / "mcore"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", folder,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    return folder


@pytest.mark.parametrize("saver,options", [("llama_hf", {"max_shard_size": "200KB"}),
                                            ("mcore", {"ckpt_format": "torch_dist"})])
def test_hf_shards_and_torch_dist_plans(megatron, tmp_path, saver, options):
    target = tmp_path / "out"
    plan = converter_core.convert("mcore", saver, megatron, target, dry_run=True, **options).plan
    assert not target.exists()
    result = converter_core.convert("mcore", saver, megatron, target, **options)
    assert result.plan is None and planned(plan) == written(target) and plan.bytes_written == result.bytes
    assert len(plan.files) == (7 if saver == "llama_hf" else 5)  # 4 shards, index, config, generation config


def test_experts_over_expert_parallel_ranks(tmp_path):
    config = transformers.Qwen3MoeConfig(**dict(BASE, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                                                num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]))
    randomize(transformers.AutoModelForCausalLM.from_config(config), 0).save_pretrained(tmp_path / "hf")
    options = dict(target_tensor_parallel_size=2, target_expert_parallel_size=2, saver_transformer_impl="local")
    plan = converter_core.convert("hf", "mcore", tmp_path / "hf", tmp_path / "out", dry_run=True, **options).plan
    converter_core.convert("hf", "mcore", tmp_path / "hf", tmp_path / "out", **options)
    assert planned(plan) == written(tmp_path / "out") and len(plan.files) == 5  # mp_rank_TT_EEE, tracker


def test_estimate_at_the_last_measured_rate(source, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dry_run, "MIN_RATE_BYTES", 0)  # the tiny model's run counts as measured
    result = converter_core.convert("llama_hf", "mcore", source, tmp_path / "real")
    plan = converter_core.convert("llama_hf", "mcore", source, tmp_path / "planned", dry_run=True).plan
    assert plan.rate == pytest.approx(result.bytes / result.seconds)
    assert plan.estimated_seconds == pytest.approx(plan.bytes_written / plan.rate)
    assert plan.bytes_written == result.bytes
    assert f"at {plan.rate / 1e9:.2f} GB/s, the last measured rate" in plan.lines()[-1]


def test_too_little_space_and_foreign_plugins_are_one_line(source, tmp_path, monkeypatch):
    monkeypatch.setattr(dry_run, "free_bytes", lambda folder: 1000)
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "mcore", source, tmp_path / "out", dry_run=True)
    assert str(caught.value).startswith(f"save_dir {tmp_path / 'out'}: the output needs ")
    assert str(caught.value).endswith("its filesystem has 1,000 bytes free") and not (tmp_path / "out").exists()

    (tmp_path / "loader_plain.py").write_text(  # a convert.py plugin: it would read and write for real
        "def add_arguments(parser):\n    pass\n\ndef load_checkpoint(queue, args):\n    raise SystemExit(9)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    process = cli("--loader", "plain", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "out",
                  "--dry-run", env=env)
    assert error_line(process) == ("converter_core: error: --dry-run: the plain loader is not built on converter_core "
                                   "and cannot plan without reading and writing; run without --dry-run")
    assert process.returncode == 1 and not (tmp_path / "out").exists()
