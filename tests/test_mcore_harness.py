"""Self-test of the megatron-core harness: it must reload what it saved, at TP 1, TP 2 and as a
hand-split PP 2 checkpoint, give the saved model's own logits, and refuse any key mismatch."""

import argparse
import os
import re
import shutil

import pytest
import torch

import mcore_harness as harness

TINY, TOKENS = harness.TINY_ARGS, harness.TINY_TOKENS
ATOL = 1e-5


def read(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def write(path, checkpoint):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(checkpoint, path)


@pytest.fixture(
    scope="module",
    params=[(1, True), (1, False), (2, True), (2, False)],
    ids=["tp1-untied", "tp1-tied", "tp2-untied", "tp2-tied"],
)
def saved(request, tmp_path_factory):
    """(iteration dir, reference logits, tp, untied) of a freshly saved tiny model."""
    tp, untied = request.param
    root = tmp_path_factory.mktemp(f"tp{tp}_{'untied' if untied else 'tied'}")
    iter_dir, logits = harness.save_mcore_checkpoint(
        root, tokens=TOKENS, tp=tp, seed=1234, untie_embeddings_and_output_weights=untied, **TINY
    )
    return iter_dir, logits, tp, untied


def test_saved_layout_is_megatron_lm_torch_format(saved):
    iter_dir, logits, tp, untied = saved
    root = os.path.dirname(iter_dir)
    assert os.path.basename(iter_dir) == "iter_0000001"
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as tracker:
        assert tracker.read() == "1"
    assert sorted(os.listdir(iter_dir)) == [f"mp_rank_{r:02d}" for r in range(tp)]
    assert logits.shape == (2, 8, 128) and logits.dtype == torch.float32
    assert logits.std() > 0.1  # not a near-constant output that would hide layout mistakes

    files = [read(harness.rank_file(iter_dir, r, 0, 1)) for r in range(tp)]
    for checkpoint in files:
        assert list(checkpoint) == [
            "args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far",
        ]
        args = checkpoint["args"]
        assert checkpoint["checkpoint_version"] == 3.0 and checkpoint["iteration"] == 1
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, 1)
        assert (args.padded_vocab_size, args.vocab_size) == (128, 96)
        assert args.group_query_attention and args.num_query_groups == 2 and args.kv_channels == 16
        assert args.untie_embeddings_and_output_weights == untied
        assert ("output_layer.weight" in checkpoint["model"]) == untied
        assert checkpoint["model"]["output_layer._extra_state"] is None
    # Replicated tensors are identical on every TP rank, as in a real training run.
    for key in ("decoder.final_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight"):
        assert all(torch.equal(f["model"][key], files[0]["model"][key]) for f in files)
    assert not torch.equal(files[0]["model"]["decoder.final_layernorm.weight"], torch.ones(64))


def test_reload_gives_the_saved_logits(saved):
    iter_dir, logits, _, _ = saved
    torch.testing.assert_close(harness.mcore_logits(iter_dir, TOKENS), logits, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tp1_untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp1_untied_for_edits")
    return harness.save_mcore_checkpoint(root, tokens=TOKENS, tp=1, seed=7, **TINY)


@pytest.mark.parametrize(
    "edit, named_key",
    [
        ("drop", "decoder.layers.1.mlp.linear_fc2.weight"),
        ("drop", "decoder.layers.0.self_attention.linear_qkv._extra_state"),
        ("add", "decoder.layers.0.self_attention.linear_qkv.bias"),
    ],
    ids=["missing-weight", "missing-extra-state", "unexpected-key"],
)
def test_key_mismatch_raises(tp1_untied, tmp_path, edit, named_key):
    iter_dir, _ = tp1_untied
    edited = tmp_path / "iter_0000001"
    shutil.copytree(iter_dir, edited)
    path = harness.rank_file(edited, 0, 0, 1)
    checkpoint = read(path)
    if edit == "drop":
        del checkpoint["model"][named_key]
    else:
        checkpoint["model"][named_key] = torch.zeros(128)
    write(path, checkpoint)
    with pytest.raises(RuntimeError, match=re.escape(named_key)):
        harness.mcore_logits(edited, TOKENS)


def split_into_two_stages(iter_dir, out_dir):
    """Hand-made TP1/PP2 copy of a TP1/PP1 checkpoint: layers renumbered per stage, and with
    tied embeddings the last stage carries the word embeddings as output_layer.weight."""
    checkpoint = read(harness.rank_file(iter_dir, 0, 0, 1))
    args = argparse.Namespace(**vars(checkpoint["args"]))
    args.pipeline_model_parallel_size = 2
    first_stage_layers = args.num_layers // 2
    stages = [{}, {}]
    for key, value in checkpoint["model"].items():
        match = harness.LAYER_KEY.fullmatch(key)
        if match:
            index = int(match.group(1))
            stage = int(index >= first_stage_layers)
            local = index - stage * first_stage_layers
            stages[stage][f"decoder.layers.{local}.{match.group(2)}"] = value
        elif key.startswith("embedding."):
            stages[0][key] = value
        else:  # final norm and output layer
            stages[1][key] = value
    if not args.untie_embeddings_and_output_weights:
        stages[1]["output_layer.weight"] = checkpoint["model"]["embedding.word_embeddings.weight"].clone()
    for stage, model in enumerate(stages):
        write(harness.rank_file(out_dir, 0, stage, 2), {**checkpoint, "args": args, "model": model})


@pytest.mark.parametrize("untied", [True, False], ids=["untied", "tied"])
def test_pipeline_stages_chain_to_the_same_logits(tmp_path, untied):
    iter_dir, logits = harness.save_mcore_checkpoint(
        tmp_path / "pp1", tokens=TOKENS, tp=1, seed=99, untie_embeddings_and_output_weights=untied, **TINY
    )
    pp2 = tmp_path / "pp2" / "iter_0000001"
    split_into_two_stages(iter_dir, pp2)
    assert harness.checkpoint_layout(pp2) == (1, 2)
    torch.testing.assert_close(harness.mcore_logits(pp2, TOKENS), logits, atol=ATOL, rtol=0)


def test_te_names_round_trip(tmp_path):
    iter_dir, logits = harness.save_mcore_checkpoint(
        tmp_path, tokens=TOKENS, tp=2, seed=5, te_names=True, untie_embeddings_and_output_weights=False, **TINY
    )
    checkpoint = read(harness.rank_file(iter_dir, 1, 0, 1))
    model = checkpoint["model"]
    assert checkpoint["args"].transformer_impl == "transformer_engine"
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in model
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in model)
    extra = model["decoder.layers.0.self_attention.core_attention._extra_state"]
    assert extra.dtype == torch.uint8 and extra.numel() == 0
    assert model["output_layer._extra_state"] is None

    torch.testing.assert_close(harness.mcore_logits(iter_dir, TOKENS, te_names=True), logits, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="layer_norm_weight"):
        harness.mcore_logits(iter_dir, TOKENS)  # local names expected: TE names are unexpected


def test_name_tables_are_inverse():
    local = {
        "decoder.layers.3.input_layernorm.weight": 1,
        "decoder.layers.3.mlp.linear_fc2._extra_state": None,
        "decoder.final_layernorm.weight": 2,
    }
    te = harness.local_to_te_state_dict(local)
    assert set(te) == {
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.3.mlp.linear_fc2._extra_state",
        "decoder.layers.3.self_attention.core_attention._extra_state",
        "decoder.final_layernorm.weight",
    }
    assert harness.te_to_local_state_dict(te) == local


def test_layout_rejects_incomplete_or_mixed_rank_folders(tmp_path):
    for name in ("mp_rank_00_000", "mp_rank_01_001"):
        write(str(tmp_path / name / "model_optim_rng.pt"), {})
    with pytest.raises(ValueError, match="grid"):
        harness.checkpoint_layout(tmp_path)
    write(str(tmp_path / "mp_rank_00" / "model_optim_rng.pt"), {})
    with pytest.raises(ValueError, match="mixes"):
        harness.checkpoint_layout(tmp_path)
