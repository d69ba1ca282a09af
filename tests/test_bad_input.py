"""Bad input: a non-zero exit, one line naming the problem, no traceback, nothing that looks complete."""

import json
import os

import pytest

from helpers import BASE, convert, error_line, make_hf_model


def to_mcore(source, target, *flags):
    return convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
                   *flags, ok=False, timeout=60)


def assert_no_checkpoint(folder):
    assert not (folder / "latest_checkpointed_iteration.txt").exists()
    assert not list(folder.glob("iter_*")) if folder.exists() else True


def test_missing_folder(tmp_path):
    process = to_mcore(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere: no such model folder" in error_line(process)
    assert_no_checkpoint(tmp_path / "out")


def test_config_without_weights(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)
    os.remove(source / "model.safetensors")
    process = to_mcore(source, tmp_path / "out")
    assert "no weights" in error_line(process) and str(source) in error_line(process)
    assert_no_checkpoint(tmp_path / "out")


def test_truncated_safetensors(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    process = to_mcore(source, tmp_path / "out")
    assert str(weights) in error_line(process)
    assert_no_checkpoint(tmp_path / "out")


def test_tp_that_does_not_divide_heads(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)  # 4 heads, 2 KV heads
    process = to_mcore(source, tmp_path / "out", "--target-tensor-parallel-size", 3)
    assert "tensor parallel size 3 does not divide" in error_line(process)
    assert_no_checkpoint(tmp_path / "out")


def test_tensor_with_wrong_shape(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 128
    (source / "config.json").write_text(json.dumps(config))
    process = to_mcore(source, tmp_path / "out")
    line = error_line(process)
    assert "model.layers.0.mlp" in line and f"[{BASE['intermediate_size']}, {BASE['hidden_size']}]" in line  # as stored
    assert_no_checkpoint(tmp_path / "out")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert "has no Megatron-Core equivalent" in error_line(to_mcore(source, tmp_path / "out"))


def test_hf_output_folder_not_empty(tmp_path):
    source, megatron, taken = tmp_path / "hf", tmp_path / "mcore", tmp_path / "taken"
    make_hf_model(source)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron)
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", taken, ok=False)
    assert "already exists and is not empty" in error_line(process)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]


def test_source_is_never_modified(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.parametrize("flag,value", [("--target-tensor-parallel-size", "0"), ("--target-pipeline-parallel-size", "-1"),
                                        ("--max-queue-size", "lots"), ("--true-vocab-size", "abc"),
                                        ("--make-vocab-size-divisible-by", "0"), ("--workers", "0")])
def test_bad_flag_values_stop_before_anything_runs(tmp_path, flag, value):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    line = error_line(to_mcore(source, tmp_path / "out", flag, value))
    kind = "an integer" if flag == "--max-queue-size" else "a positive integer"  # convert.py: queue size 0 = unbounded
    assert f"argument {flag}: must be {kind}, got '{value}'" in line
    assert not (tmp_path / "out").exists()


def test_bad_shard_size(tmp_path):
    source, megatron = tmp_path / "hf", tmp_path / "mcore"
    make_hf_model(source, num_hidden_layers=2)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron)
    process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", tmp_path / "out",
                      "--max-shard-size", "lots", ok=False)
    assert "argument --max-shard-size: must be a size such as 5GB or 500MB, got 'lots'" in error_line(process)
    assert not (tmp_path / "out").exists()
