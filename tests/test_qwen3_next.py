"""Qwen3-Next (Qwen3NextForCausalLM) through the generic `hf` plugins: Gated DeltaNet linear attention on most
layers and gated softmax attention every full_attention_interval-th, zero-centred norms, partial rotary, q/k
norms, experts with a sigmoid-gated shared expert (and one dense layer, mlp_only_layers). A tiny model made with
transformers (float32, config.json as Qwen releases it: full_attention_interval, no layer_types) goes to
megatron-core at TP 2, whose logits equal transformers' within 1e-4, and comes back bit-exact; the same as
torch_dist, where megatron-core (GatedDeltaNet.sharded_state_dict) keeps the DeltaNet's in_proj and conv1d one
tensor per part, each split over TP on its own: megatron-core loads ours at TP 2 with transformers' logits and
saves it again, and both ours and its own come back to HF bit-exact.

megatron-core 0.16.1 runs Gated DeltaNet only with fla's kernels and TransformerEngine, which are not on a
CPU: tests/mcore_harness.py (hybrid_layer_specs) builds its GatedDeltaNet from local linears, stands in
megatron-core's own torch chunked gated-delta rule (torch_chunk_gated_delta_rule) for fla's and a torch l2norm
for fla's, and a zero-centred RMSNorm (x / rms(x) * (1 + w), as TransformerEngine's zero_centered_gamma) for
every norm, the local norms refusing zero-centred weights. Its conv1d is megatron-core's own nn.Conv1d path.
None of these holds a weight of its own, and the harness loads every rank file strictly (a weight megatron-core
would leave unused or unloaded fails). The tolerance stays 1e-4: both sides run the same chunked delta rule in
float32 on 24 tokens (one chunk), and the largest difference seen is below 1e-5.

The DeltaNet's gated output norm is plain in transformers (w) and zero-centred in megatron-core (stored w - 1):
exact both ways for weights in [0.5, 2]; the model's are drawn there (helpers.randomize draws norms 1 + 0.3 N(0, 1),
a few of which would fall below 0.5, where w - 1 rounds)."""

import json
import shutil

import pytest
import torch
import transformers

from converter_core import plugin
from converter_core.errors import ConversionError
from helpers import (BASE, assert_bit_identical, convert, edited_copy, error_line, hf_logits, make_hf_model, randomize,
                     read_config, read_safetensors_folder, tokens_for)
from dist_harness import dist_logits, resave_dist_checkpoint, torch_dist_tensors
from mcore_harness import mcore_logits
from test_bad_input import assert_no_checkpoint
from test_moe import make_model, refused_into_mcore, to_hf, to_mcore

QWEN3_NEXT = dict(BASE, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                  full_attention_interval=2)
LAYERS = QWEN3_NEXT["num_hidden_layers"]


def released_config(config):
    """config.json as Qwen releases Qwen3-Next: full_attention_interval instead of layer_types, rope_theta and
    partial_rotary_factor at the top (transformers writes layer_types and rope_parameters)."""
    config = dict(config)
    config.pop("layer_types")
    rope = config.pop("rope_parameters")
    return dict(config, full_attention_interval=QWEN3_NEXT["full_attention_interval"], rope_theta=rope["rope_theta"],
                partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_next")
    source, megatron, back = folder / "hf", folder / "mcore", folder / "back"
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(transformers.Qwen3NextConfig(**QWEN3_NEXT)), 0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                parameter.clamp_(0.5, 1.9)
    model.save_pretrained(source)
    (source / "config.json").write_text(json.dumps(released_config(read_config(source)), indent=2))
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2)
    to_hf(megatron, back)
    return source, megatron, back, model


def test_config_as_released_reads_as_the_model(tp2):
    """transformers reads the released-style config.json as the model it was made from (the reference below)."""
    source, _, _, model = tp2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert [layer.block_type for layer in loaded.model.layers] == ["linear_attention", "full_attention"] * (LAYERS // 2)
    tokens = tokens_for(BASE["vocab_size"])
    assert torch.equal(hf_logits(loaded.eval(), tokens), hf_logits(model.eval(), tokens))


def test_logits_in_megatron_core(tp2):
    _, megatron, _, model = tp2
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model.eval(), tokens), atol=1e-4, rtol=0)


def test_round_trip_is_bit_exact_with_the_released_config(tp2):
    source, _, back, _ = tp2
    assert_bit_identical(source, back)
    assert (back / "config.json").read_text() and read_config(back) == read_config(source)


def test_megatron_args_and_deltanet_shards(tp2):
    """Megatron-LM's own arg names; each TP rank's in_proj is [q_r; k_r; v_r; z_r; beta_r; alpha_r] of the
    per-key-head-group HF projections, its conv1d [q_r; k_r; v_r]; the gated norm is stored minus one."""
    source, megatron, _, _ = tp2
    hf = read_safetensors_folder(source)
    groups, key_dim, value_dim = QWEN3_NEXT["linear_num_key_heads"], QWEN3_NEXT["linear_key_head_dim"], \
        QWEN3_NEXT["linear_value_head_dim"]
    ratio = QWEN3_NEXT["linear_num_value_heads"] // groups
    qkvz = hf["model.layers.0.linear_attn.in_proj_qkvz.weight"].reshape(groups, -1, BASE["hidden_size"])
    ba = hf["model.layers.0.linear_attn.in_proj_ba.weight"].reshape(groups, -1, BASE["hidden_size"])
    q, k, v, z = torch.split(qkvz, [key_dim, key_dim, ratio * value_dim, ratio * value_dim], dim=1)
    beta, alpha = torch.split(ba, [ratio, ratio], dim=1)
    conv = hf["model.layers.0.linear_attn.conv1d.weight"]
    conv_parts = torch.split(conv, [groups * key_dim, groups * key_dim, groups * ratio * value_dim])
    for rank in range(2):
        state = torch.load(megatron / "iter_0000001" / f"mp_rank_0{rank}" / "model_optim_rng.pt", weights_only=False)
        args = state["args"]
        assert (args.experimental_attention_variant, args.linear_attention_freq, args.attention_output_gate,
                args.layernorm_zero_centered_gamma, args.moe_shared_expert_gate, args.rotary_percent,
                args.moe_layer_freq) == ("gated_delta_net", 2, True, True, True, 0.25, [1, 0, 1, 1])
        assert (args.linear_num_key_heads, args.linear_num_value_heads, args.linear_key_head_dim,
                args.linear_value_head_dim, args.linear_conv_kernel_dim) == (2, 4, 8, 16, 4)
        mine = slice(rank, rank + 1)  # one key-head group per rank at TP 2
        expected = torch.cat([part[mine].flatten(0, 1) for part in (q, k, v, z, beta, alpha)])
        model = state["model"]
        assert torch.equal(model["decoder.layers.0.self_attention.in_proj.weight"], expected)
        assert torch.equal(model["decoder.layers.0.self_attention.conv1d.weight"],
                           torch.cat([torch.chunk(part, 2)[rank] for part in conv_parts]))
        assert torch.equal(model["decoder.layers.0.self_attention.out_norm.weight"],
                           hf["model.layers.0.linear_attn.norm.weight"] - 1)
        assert torch.equal(model["decoder.layers.0.self_attention.A_log"],
                           torch.chunk(hf["model.layers.0.linear_attn.A_log"], 2)[rank])
        assert torch.equal(model["decoder.layers.0.mlp.shared_experts.gate_weight"],
                           hf["model.layers.0.mlp.shared_expert_gate.weight"])


def test_a_megatron_made_checkpoint_writes_the_same_model(tp2, tmp_path):
    """Without the source's config.json in the args (a checkpoint Megatron-LM trained), the HF saver writes
    config.json from the args alone: transformers builds the same model from it (head_dim, layer_types, the
    DeltaNet sizes and the shared expert are all said), with the same tensors."""
    source, megatron, _, model = tp2
    made, back = tmp_path / "mcore", tmp_path / "back"
    shutil.copytree(megatron, made)
    for path in made.glob("iter_0000001/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        del state["args"].hf_config_json
        torch.save(state, path)
    to_hf(made, back)
    assert_bit_identical(source, back)
    tokens = tokens_for(BASE["vocab_size"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    assert torch.equal(hf_logits(loaded, tokens), hf_logits(model.eval(), tokens))


def test_layer_types_of_another_length_are_refused(tp2, tmp_path):
    source = edited_copy(tp2[0], tmp_path / "hf", config=lambda config: dict(
        config, layer_types=["linear_attention", "full_attention"] * (LAYERS // 2 - 1)))
    line = refused_into_mcore(source, tmp_path / "out")
    assert "config.json" in line and "layer_types" in line and f"{LAYERS} layers" in line


def test_layer_types_against_the_interval_are_refused(tp2, tmp_path):
    source = edited_copy(tp2[0], tmp_path / "hf", config=lambda config: dict(
        config, layer_types=["linear_attention"] * (LAYERS - 1) + ["full_attention"]))
    line = refused_into_mcore(source, tmp_path / "out")
    assert "config.json" in line and "layer_types" in line and "full_attention_interval (2)" in line


def test_deltanet_tensor_of_the_wrong_shape_is_refused(tp2, tmp_path):
    name = "model.layers.2.linear_attn.in_proj_ba.weight"
    source = edited_copy(tp2[0], tmp_path / "hf", tensors=lambda state: state.update({name: state[name][:-2]}))
    line = refused_into_mcore(source, tmp_path / "out")
    assert name in line and f"[6, {BASE['hidden_size']}]" in line and f"[8, {BASE['hidden_size']}]" in line


def test_tensor_parallel_must_divide_the_deltanet_key_heads(tmp_path):
    """in_proj, conv1d, A_log and dt_bias are split by DeltaNet heads: a TP size that does not divide them is
    one line, not a checkpoint with heads cut in half."""
    source = tmp_path / "hf"
    make_model(source, transformers.Qwen3NextConfig(**dict(QWEN3_NEXT, linear_num_key_heads=1,
                                                           linear_num_value_heads=2)))
    line = error_line(to_mcore(source, tmp_path / "out", "--target-tensor-parallel-size", 2, ok=False))
    assert "tensor parallel size 2 does not divide the 1 linear-attention key heads" in line
    assert_no_checkpoint(tmp_path / "out")


def test_zero_centred_norms_are_refused_by_a_family_with_plain_ones(tmp_path):
    """Norm(zero_centred=...) is the norm feature that holds layernorm_zero_centered_gamma: a Llama checkpoint
    whose args say its norm weights are stored minus one has no Llama form, said in one line."""
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    make_hf_model(source)
    to_mcore(source, megatron)
    for path in megatron.glob("iter_0000001/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        del state["args"].hf_config_json  # a Megatron-LM run with --apply-layernorm-1p
        state["args"].layernorm_zero_centered_gamma = state["args"].apply_layernorm_1p = True
        torch.save(state, path)
    line = error_line(to_hf(megatron, back, ok=False))
    assert "llama: layernorm_zero_centered_gamma True (llama's norms are not zero-centred" in line
    assert not back.exists()


def test_transformer_engine_names_round_trip(tp2, tmp_path):
    """megatron-core's experimental-attention block spec (TransformerEngine only) fuses a DeltaNet layer's input
    norm into its in_proj (TELayerNormColumnParallelLinear: in_proj.layer_norm_weight, metainfo
    fuse_input_layernorm) and a softmax layer's into linear_qkv; the way back reads those names bit-exactly."""
    source = tp2[0]
    megatron, back = tmp_path / "te", tmp_path / "back"
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "transformer_engine")
    model = torch.load(megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "decoder.layers.0.self_attention.in_proj.layer_norm_weight" in model
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in model
    assert not [key for key in model if key.endswith("input_layernorm.weight")]
    assert "decoder.layers.0.self_attention.core_attention._extra_state" not in model  # GatedDeltaNet has none
    to_hf(megatron, back)
    assert_bit_identical(source, back)


@pytest.fixture(scope="module")
def dist(tp2, tmp_path_factory):
    """The same model as torch_dist (megatron-core stores a DeltaNet's in_proj and conv1d one tensor per part),
    and back to HF."""
    folder = tmp_path_factory.mktemp("qwen3_next_dist")
    megatron, back = folder / "dist", folder / "back"
    to_mcore(tp2[0], megatron, "--ckpt-format", "torch_dist", "--target-tensor-parallel-size", 2)
    to_hf(megatron, back)
    return megatron / "iter_0000001", back


def test_torch_dist_logits_in_megatron_core(tp2, dist):
    """megatron-core loads our torch_dist strictly at TP 2 (each part resharded on its own) and gives
    transformers' logits."""
    tokens = tokens_for(BASE["vocab_size"])
    logits = dist_logits(dist[0], tokens, tp=2)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(tp2[3].eval(), tokens), atol=1e-4, rtol=0)


def test_torch_dist_parts_and_round_trip(tp2, dist):
    """Each DeltaNet layer holds in_proj.weight.<part> and conv1d.weight.<part> (per layer: linear and softmax
    layers mix), never the fused tensor; the way back is bit-exact."""
    keys = set(torch_dist_tensors(dist[0]))
    prefix = "decoder.layers.0.self_attention."
    assert {prefix + f"in_proj.weight.{part}" for part in ("query", "key", "value", "z", "beta", "alpha")} <= keys
    assert {prefix + f"conv1d.weight.{part}" for part in ("query", "key", "value")} <= keys
    assert not [key for key in keys if key.endswith(("in_proj.weight", "conv1d.weight"))]
    assert_bit_identical(tp2[0], dist[1])


def test_a_torch_dist_megatron_core_saved_reads_back(tp2, dist, tmp_path):
    """megatron-core loads our torch_dist at TP 2 and saves it again with its own dist_checkpointing.save (its
    sharded_state_dict's keys, shapes and TP chunks); our loader reads that to the same HF, bit-exact."""
    resaved, back = tmp_path / "resaved", tmp_path / "back"
    resave_dist_checkpoint(dist[0], resaved, tp=2)
    to_hf(resaved, back)
    assert_bit_identical(tp2[0], back)


def test_per_rank_files_to_torch_dist_write_the_same_tensors(tp2, dist, tmp_path):
    """The TP 2 rank files (each rank's in_proj [q_r; k_r; ...] arriving as rank blocks) give torch_dist the same
    tensors, part by part, as the HF model did."""
    out = tmp_path / "dist"
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tp2[1], "--save-dir", out, "--ckpt-format",
            "torch_dist", "--saver-transformer-impl", "local")
    expected, written = torch_dist_tensors(dist[0]), torch_dist_tensors(out / "iter_0000001")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], expected[key]) for key in expected)


def test_a_torch_dist_missing_a_part_is_refused(dist, tmp_path):
    """A torch_dist DeltaNet layer without one of its parts is one line naming the file and the tensor."""
    import torch.distributed.checkpoint as dcp
    missing = "decoder.layers.2.self_attention.in_proj.weight.beta"
    tensors = torch_dist_tensors(dist[0])
    del tensors[missing]
    target = tmp_path / "dist" / "iter_0000001"
    dcp.save(tensors, checkpoint_id=str(target), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copy(dist[0] / name, target / name)
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("1")
    line = error_line(to_hf(tmp_path / "dist", tmp_path / "back", ok=False))
    assert f"{target / '.metadata'}: layer 2: no tensor decoder.layers.self_attention.in_proj.weight.beta" in line
    assert not (tmp_path / "back").exists()


def test_dist_part_is_for_parts_of_a_fused_parameter():
    with pytest.raises(ConversionError, match="dist_part names a part of a fused parameter"):
        plugin.register_layer_key(plugin.LayerKey("whole weight", ("hidden",), plugin.COLUMN, "x.weight",
                                                  dist_part="x"))
