"""Self-test of the megatron-core harness: it must reload what it saved, at TP 1, TP 2 and as a
hand-split PP 2 checkpoint, give the saved model's own logits, and refuse any key mismatch; and it must
build the model the args describe (LayerNorm, GELU as megatron-core computes it, squared ReLU, biases),
checked against transformers' Starcoder2, or refuse it."""

import argparse
import os
import re
import shutil

import pytest
import torch
import transformers

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


# --------------------------------------------------------------------------------------------
# Non-Llama models: LayerNorm, non-gated GELU or squared ReLU, biases on every linear and norm.
# The reference is transformers' Starcoder2 (LayerNorm with bias, q/k/v/o and c_fc/c_proj with
# bias, a non-gated MLP with any hidden_act, full non-interleaved rope), built from the saved files.
# --------------------------------------------------------------------------------------------

# How a TP-sharded local-spec tensor is split across ranks (dim), for a non-gated dense model;
# a name not listed is replicated.
TP_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
}


def merged_state(iter_dir, tp):
    """The full (TP 1) tensors of a saved checkpoint; replicated ones must be equal on every rank."""
    shards = [read(harness.rank_file(iter_dir, r, 0, 1))["model"] for r in range(tp)]
    merged = {}
    for key, value in shards[0].items():
        if value is None:  # _extra_state of the local linears
            continue
        match = harness.LAYER_KEY.fullmatch(key)
        dim = TP_SPLIT_DIM.get(match.group(2) if match else key)
        if dim is None:
            assert all(torch.equal(shard[key], value) for shard in shards), key
            merged[key] = value
        else:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=dim)
    return merged


def starcoder2_logits(state, args, hidden_act, tokens):
    """Logits of transformers' Starcoder2ForCausalLM holding the merged Megatron tensors."""
    heads, groups, head_dim = args.num_attention_heads, args.num_query_groups, args.kv_channels
    per_group = heads // groups
    config = transformers.Starcoder2Config(
        vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=heads, num_key_value_heads=groups,
        hidden_act=hidden_act, max_position_embeddings=args.max_position_embeddings,
        norm_epsilon=harness.norm_epsilon(args), use_bias=True, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rotary_base)},
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
    )
    config._attn_implementation = "eager"
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
          "model.norm.weight": state["decoder.final_layernorm.weight"],
          "model.norm.bias": state["decoder.final_layernorm.bias"],
          "lm_head.weight": state.get("output_layer.weight", state["embedding.word_embeddings.weight"])}
    for i in range(args.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Megatron's fused QKV: per query group, that group's query heads, then its key, then its value.
        for part in ("weight", "bias"):
            qkv = state[m + "self_attention.linear_qkv." + part].reshape(groups, per_group + 2, head_dim, -1)
            hf[p + "self_attn.q_proj." + part] = qkv[:, :per_group].reshape(heads * head_dim, -1).squeeze(-1)
            hf[p + "self_attn.k_proj." + part] = qkv[:, per_group].reshape(groups * head_dim, -1).squeeze(-1)
            hf[p + "self_attn.v_proj." + part] = qkv[:, per_group + 1].reshape(groups * head_dim, -1).squeeze(-1)
        for megatron_name, hf_name in (("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                                       ("mlp.linear_fc2", "mlp.c_proj"), ("input_layernorm", "input_layernorm"),
                                       ("pre_mlp_layernorm", "post_attention_layernorm")):
            for part in ("weight", "bias"):
                hf[f"{p}{hf_name}.{part}"] = state[f"{m}{megatron_name}.{part}"]
    model = transformers.Starcoder2ForCausalLM(config).eval()
    model.load_state_dict(hf, strict=True)
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


BIASED_LAYERNORM = dict(TINY, normalization="LayerNorm", norm_epsilon=1e-5, swiglu=False, add_bias_linear=True)
# Matrices and biases of N(0, 0.2): pre-activations large enough that tanh-approximate and exact GELU give
# logits further apart than the tolerance (checked below with the other activation).
WIDE_STD = 0.2
REFERENCE_ATOL = 1e-4


@pytest.mark.parametrize(
    "tp, untied, overrides, hidden_act, other_act",
    [
        (1, True, {}, "gelu_pytorch_tanh", "gelu"),
        (2, False, {}, "gelu_pytorch_tanh", "gelu"),
        (1, True, {"bias_gelu_fusion": False}, "gelu", "gelu_pytorch_tanh"),
        (2, True, {"squared_relu": True, "bias_gelu_fusion": False}, "relu2", "gelu"),
    ],
    ids=["tanh-gelu-tp1", "tanh-gelu-tp2-tied", "exact-gelu-tp1", "squared-relu-tp2"],
)
def test_layernorm_biased_models_match_starcoder2(tmp_path, tp, untied, overrides, hidden_act, other_act):
    iter_dir, logits = harness.save_mcore_checkpoint(
        tmp_path, tokens=TOKENS, tp=tp, seed=21, init_std=WIDE_STD,
        **{**BIASED_LAYERNORM, "untie_embeddings_and_output_weights": untied, **overrides})
    args = read(harness.rank_file(iter_dir, 0, 0, 1))["args"]
    state = merged_state(iter_dir, tp)
    for name in ("decoder.final_layernorm.bias", "decoder.layers.1.input_layernorm.bias",
                 "decoder.layers.1.self_attention.linear_qkv.bias", "decoder.layers.1.mlp.linear_fc2.bias"):
        assert state[name].abs().max() > 0.1, name  # random, not left at zero
    assert ("output_layer.weight" in state) == untied

    torch.testing.assert_close(logits, starcoder2_logits(state, args, hidden_act, TOKENS), atol=REFERENCE_ATOL, rtol=0)
    # The check can tell the activations apart: the other one is far outside the tolerance.
    assert (logits - starcoder2_logits(state, args, other_act, TOKENS)).abs().max() > 5 * REFERENCE_ATOL
    if tp == 2:  # the args saved are enough to build the same model again
        torch.testing.assert_close(harness.mcore_logits(iter_dir, TOKENS), logits, atol=ATOL, rtol=0)


def test_layernorm_round_trips_with_te_names(tmp_path):
    iter_dir, logits = harness.save_mcore_checkpoint(tmp_path, tokens=TOKENS, tp=1, seed=4, te_names=True,
                                                     **BIASED_LAYERNORM)
    model = read(harness.rank_file(iter_dir, 0, 0, 1))["model"]
    assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", "decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
            "decoder.final_layernorm.bias"} <= model.keys()
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in model)
    torch.testing.assert_close(harness.mcore_logits(iter_dir, TOKENS, te_names=True), logits, atol=ATOL, rtol=0)


def test_model_choices_follow_megatron_lm():
    def choices(**overrides):
        return harness.model_choices(harness.megatron_args(**overrides))

    assert choices() == dict(normalization="RMSNorm", activation="silu", gated=True, bias_activation_fusion=False)
    # Without biases Megatron-LM turns the bias-GELU fusion off: exact GELU.
    assert choices(swiglu=False) == dict(normalization="RMSNorm", activation="gelu", gated=False,
                                         bias_activation_fusion=False)
    # With biases the fusion is on by default: megatron-core's fused bias-GELU, the tanh approximation.
    assert choices(swiglu=False, add_bias_linear=True, normalization="LayerNorm") == dict(
        normalization="LayerNorm", activation="gelu", gated=False, bias_activation_fusion=True)
    assert choices(swiglu=False, squared_relu=True)["activation"] == "squared_relu"
    # gpt-oss's gated quick-GELU (its clamp and offset are TransformerConfig fields: gpt_oss_fields).
    assert choices(swiglu=False, quick_geglu=True) == dict(normalization="RMSNorm", activation="quick_gelu", gated=True,
                                                           bias_activation_fusion=False)
    # openai_gelu and onnx_safe select activations in Megatron-LM's legacy models only.
    assert choices(swiglu=False, openai_gelu=True, onnx_safe=True) == choices(swiglu=False)
    # The fixture Megatron-LM wrote (SwiGLU, RMSNorm, no biases) is buildable.
    assert harness.model_choices(harness.megatron_args(base=harness.megatron_lm_args()))["activation"] == "silu"
    assert harness.megatron_args(add_bias_linear=True).add_qkv_bias  # validate_args keeps them in sync


@pytest.mark.parametrize(
    "overrides, error, named",
    [
        ({"normalization": "L2Norm"}, NotImplementedError, "normalization"),
        ({"normalization": "LayerNorm", "apply_layernorm_1p": True}, NotImplementedError, "apply_layernorm_1p"),
        ({"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True}, NotImplementedError,
         "layernorm_zero_centered_gamma"),  # zero-centred RMSNorm is built (ZeroCentredRMSNorm)
        ({"use_te_activation_func": True}, NotImplementedError, "use_te_activation_func"),
        ({"apply_residual_connection_post_layernorm": True}, NotImplementedError,
         "apply_residual_connection_post_layernorm"),
        ({"position_embedding_type": "learned_absolute"}, NotImplementedError, "position_embedding_type"),
        ({"squared_relu": True}, ValueError, "swiglu and squared_relu"),
        ({"swiglu": False, "squared_relu": True, "add_bias_linear": True}, ValueError, "bias_gelu_fusion=False"),
    ],
    ids=["l2norm", "layernorm-1p", "zero-centered-gamma", "te-activation",
         "post-layernorm-residual", "learned-positions", "swiglu-and-squared-relu", "fused-squared-relu"],
)
def test_what_cannot_be_built_is_refused_before_any_process(tmp_path, overrides, error, named):
    with pytest.raises(error, match=re.escape(named)):
        harness.save_mcore_checkpoint(tmp_path, tokens=TOKENS, **{**TINY, **overrides})
    assert not os.path.exists(tmp_path / "iter_0000001")  # refused before anything was written


def test_a_refused_checkpoint_is_refused_by_mcore_logits(tp1_untied, tmp_path):
    iter_dir, _ = tp1_untied
    edited = tmp_path / "iter_0000001"
    shutil.copytree(iter_dir, edited)
    path = harness.rank_file(edited, 0, 0, 1)
    checkpoint = read(path)
    checkpoint["args"].use_te_activation_func = True
    write(path, checkpoint)
    with pytest.raises(RuntimeError, match="NotImplementedError: harness cannot build use_te_activation_func"):
        harness.mcore_logits(edited, TOKENS)
