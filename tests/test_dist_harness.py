"""Self-test of the torch_dist harness: what it saves at TP 1 and TP 2 must have Megatron-LM's
torch_dist layout, reload at TP 1 and TP 2 (Megatron reshards) to the saved model's own logits,
and a broken or mismatched checkpoint must make the load raise."""

import argparse
import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import dist_harness as harness

from mcore_harness import TINY_ARGS as TINY, TINY_TOKENS as TOKENS
ATOL = 1e-5
_SAVED = {}


def saved_checkpoint(tmp_path_factory, tp, untied):
    """(iteration dir, logits) of a tiny model saved once per session for (tp, untied)."""
    if (tp, untied) not in _SAVED:
        root = tmp_path_factory.mktemp(f"dist_tp{tp}_{'untied' if untied else 'tied'}")
        _SAVED[tp, untied] = harness.save_dist_checkpoint(
            root, tokens=TOKENS, tp=tp, seed=4321, untie_embeddings_and_output_weights=untied, **TINY
        )
    return _SAVED[tp, untied]


@pytest.fixture(
    params=[(1, True), (1, False), (2, True), (2, False)],
    ids=["tp1-untied", "tp1-tied", "tp2-untied", "tp2-tied"],
)
def saved(request, tmp_path_factory):
    tp, untied = request.param
    iter_dir, logits = saved_checkpoint(tmp_path_factory, tp, untied)
    return iter_dir, logits, tp, untied


def copy_checkpoint(iter_dir, tmp_path):
    """A private copy of an iteration folder, safe to damage."""
    copy = os.path.join(tmp_path, "iter_0000001")
    shutil.copytree(iter_dir, copy)
    return copy


def edit_args(iter_dir, **changes):
    """Rewrite common.pt with some args changed (the shards stay as saved)."""
    path = os.path.join(iter_dir, "common.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(path, weights_only=True)
    for name, value in changes.items():
        setattr(common["args"], name, value)
    torch.save(common, path)


def test_saved_layout_is_megatron_lm_torch_dist(saved):
    iter_dir, logits, tp, untied = saved
    root = os.path.dirname(iter_dir)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as tracker:
        assert tracker.read() == "1"
    files = sorted(os.listdir(iter_dir))
    assert files == sorted([".metadata", "common.pt", "metadata.json"] + [f"__{r}_0.distcp" for r in range(tp)])
    with open(os.path.join(iter_dir, "metadata.json")) as config:
        assert json.load(config) == {
            "sharded_backend": "torch_dist",
            "sharded_backend_version": 1,
            "common_backend": "torch",
            "common_backend_version": 1,
        }
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(os.path.join(iter_dir, "common.pt"), weights_only=True)
    assert list(common) == [
        "args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"
    ]
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    assert common["args"].ckpt_format == "torch_dist" and common["args"].tensor_model_parallel_size == tp

    keys = FileSystemReader(iter_dir).read_metadata().state_dict_metadata
    assert not any(key.startswith("model.") for key in keys)  # ShardedTensor keys, no prefix
    assert ("output_layer.weight" in keys) == untied
    qkv = keys["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (2, (4 + 2 * 2) * 16, 64)  # layers stacked on a leading axis
    assert tuple(keys["decoder.layers.mlp.linear_fc1.weight"].size) == (2, 2 * 128, 64)  # [W; V]
    assert logits.shape == (2, 8, 128) and logits.dtype == torch.float32
    assert logits.std() > 0.1  # not a near-constant output that would hide layout mistakes


@pytest.mark.parametrize("load_tp", [1, 2], ids=["load-tp1", "load-tp2"])
def test_reload_gives_the_saved_logits(saved, load_tp):
    iter_dir, logits, _, _ = saved
    loaded = harness.dist_logits(iter_dir, TOKENS, tp=load_tp)
    assert loaded.dtype == torch.float32 and loaded.shape == logits.shape
    torch.testing.assert_close(loaded, logits, atol=ATOL, rtol=0)


def test_missing_dcp_metadata_raises(tmp_path_factory, tmp_path):
    iter_dir, _ = saved_checkpoint(tmp_path_factory, 1, True)
    broken = copy_checkpoint(iter_dir, tmp_path)
    os.remove(os.path.join(broken, ".metadata"))
    with pytest.raises(RuntimeError, match=r"FileNotFoundError.*\.metadata"):
        harness.dist_logits(broken, TOKENS)


@pytest.mark.parametrize("untied", [True, False], ids=["unexpected-output-layer", "missing-output-layer"])
def test_tensor_mismatch_raises(tmp_path_factory, tmp_path, untied):
    # Flipping tying in the args makes the model expect one tensor more or less than is stored.
    iter_dir, _ = saved_checkpoint(tmp_path_factory, 1, untied)
    mismatched = copy_checkpoint(iter_dir, tmp_path)
    edit_args(mismatched, untie_embeddings_and_output_weights=not untied)
    with pytest.raises(RuntimeError, match="output_layer.weight"):
        harness.dist_logits(mismatched, TOKENS)


def test_vocab_padding_mismatch_raises(tmp_path_factory, tmp_path):
    # Megatron itself would zero-fill the missing rows of an allow_shape_mismatch tensor.
    iter_dir, _ = saved_checkpoint(tmp_path_factory, 1, True)
    mismatched = copy_checkpoint(iter_dir, tmp_path)
    edit_args(mismatched, padded_vocab_size=192)
    with pytest.raises(RuntimeError, match=r"embedding.word_embeddings.weight has global shape \(128, 64\)"):
        harness.dist_logits(mismatched, TOKENS)
