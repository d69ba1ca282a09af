"""Fail closed where a run used to go wrong quietly or leave debris: mis-shaped TP/EP shards, staged
output of killed runs, interrupts at random moments, cancellation and callbacks of the Python API,
tied weights that differ, stalls. Each case runs the real command line or the real API."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_bit_identical, convert, error_line, make_hf_model, read_safetensors_folder

RANK_FILE = "model_optim_rng.pt"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fail_closed") / "hf"
    make_hf_model(folder, num_hidden_layers=4)
    return folder


@pytest.fixture(scope="module")
def mcore_tp2pp2(hf_source):
    target = hf_source.parent / "mcore"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", hf_source, "--save-dir", target,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    return target


def assert_nothing_complete(target):
    target = Path(target)
    assert not target.exists() or not any(target.iterdir()), list(target.rglob("*"))
    assert not [p for p in target.parent.iterdir() if ".partial" in p.name], list(target.parent.iterdir())


def reshape_in_rank_file(folder, rank, name, change):
    """Replace `name` in one rank file of a copy of a Megatron checkpoint by change(tensor)."""
    path = folder / "iter_0000001" / rank / RANK_FILE
    state = torch.load(path, weights_only=False)
    state["model"][name] = change(state["model"][name])
    torch.save(state, path)


def extra_columns(tensor):
    return torch.cat([tensor, torch.ones(tensor.shape[0], 8, dtype=tensor.dtype)], dim=1)


def extra_rows(tensor):
    return torch.cat([tensor, torch.ones(8, *tensor.shape[1:], dtype=tensor.dtype)])


MISSHAPEN = {  # (rank folder, tensor, change)
    "qkv columns": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.weight", extra_columns),
    "qkv rows": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.weight", extra_rows),
    "proj rows": ("mp_rank_01_000", "decoder.layers.1.self_attention.linear_proj.weight", extra_rows),
    "proj columns": ("mp_rank_01_000", "decoder.layers.1.self_attention.linear_proj.weight", extra_columns),
    "fc1 columns": ("mp_rank_01_001", "decoder.layers.0.mlp.linear_fc1.weight", extra_columns),
    "fc2 rows": ("mp_rank_00_001", "decoder.layers.1.mlp.linear_fc2.weight", extra_rows),
    "embedding columns": ("mp_rank_01_000", "embedding.word_embeddings.weight", extra_columns),
    "output columns": ("mp_rank_01_001", "output_layer.weight", extra_columns),
    "norm": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
             lambda t: torch.cat([t, t[:8]])),
    "final norm": ("mp_rank_00_001", "decoder.final_layernorm.weight", lambda t: torch.cat([t, t[:8]])),
}


@pytest.mark.parametrize("saver", ["llama_hf", "mcore"])
@pytest.mark.parametrize("case", sorted(MISSHAPEN))
def test_a_misshapen_tensor_parallel_shard_is_refused(tmp_path, mcore_tp2pp2, case, saver):
    rank, name, change = MISSHAPEN[case]
    source, target = tmp_path / "mcore", tmp_path / "out"
    shutil.copytree(mcore_tp2pp2, source)
    reshape_in_rank_file(source, rank, name, change)
    flags = ["--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1] if saver == "mcore" else []
    line = error_line(convert("--loader", "mcore", "--saver", saver, "--load-dir", source, "--save-dir", target,
                              *flags, ok=False))
    assert "(unexpected" not in line
    assert name.rsplit(".", 1)[0].split("decoder.")[-1] in line and "shape" in line, line
    assert_nothing_complete(target)
