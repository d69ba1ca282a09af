"""DeepSeek-V3 (multi-latent attention, sigmoid routing with a score-correction bias, expert groups,
routed scaling, shared experts, first layers dense) through the generic `hf` plugins: megatron-core's
MLA GPTModel gives transformers' logits, and HF -> mcore -> HF is bit-exact."""

import json

import pytest
import torch
import transformers

from dist_harness import dist_logits
from helpers import BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config, tokens_for
from mcore_harness import mcore_logits, save_mcore_checkpoint

VOCAB = BASE["vocab_size"]
# topk = 2 x topk_group, as in the real model (else Megatron-Core and transformers score groups differently);
# rms_norm_eps 1e-6: transformers' latent norms always use 1e-6, Megatron-Core's the model's epsilon.
DEEPSEEK = dict(BASE, num_key_value_heads=4, rms_norm_eps=1e-6, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
                moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                norm_topk_prob=True)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def make_model(folder, dtype=torch.float32, **overrides):
    config = transformers.DeepseekV3Config(**dict(DEEPSEEK, **overrides))
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), 0).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a bias that changes which experts are chosen
        for name, bias in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    model.to(dtype)
    for module in model.modules():  # transformers keeps the routing bias (and router) in float32
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    model.save_pretrained(folder)
    return model.float()


def to_mcore(source, target, *flags, ok=True):
    return convert("--loader", "hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target, *flags, ok=ok)


def to_hf(source, target, *flags, ok=True):
    return convert("--loader", "mcore", "--saver", "hf", "--load-dir", source, "--save-dir", target, *flags, ok=ok)


def assert_back_and_from_args(source, megatron, model, tokens, tmp_path):
    """mcore -> HF is bit-exact with the same config.json; with the HF config deleted from the args (as if
    Megatron had made the checkpoint) the saver picks the same family from MLA (+ muP), with the logits."""
    to_hf(megatron, tmp_path / "back")
    assert_bit_identical(source, tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(source)
    for rank in (megatron / "iter_0000001").glob("*/model_optim_rng.pt"):
        state = torch.load(rank, weights_only=False)
        del state["args"].hf_config_json, state["args"].hf_source_dir
        torch.save(state, rank)
    to_hf(megatron, tmp_path / "from-args")
    assert read_config(tmp_path / "from-args")["model_type"] == read_config(source)["model_type"]
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from-args").eval()
    torch.testing.assert_close(hf_logits(rebuilt, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,overrides", [
    ("local", {}),
    # TE names (latent norms fused into the up projections, down projections whole on each rank), one
    # query projection, rotate-half rope (rows reordered for Megatron's interleaved pairs), YaRN
    ("transformer_engine", {"q_lora_rank": None, "rope_interleave": False, "rope_scaling": YARN}),
])
def test_logits_in_megatron_core_and_bit_exact_back(tmp_path, impl, overrides):
    source, megatron = tmp_path / "hf", tmp_path / "mcore"
    model = make_model(source, **overrides)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2, "--saver-transformer-impl", impl)
    state = torch.load(megatron / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    args = state["args"]
    assert (args.multi_latent_attention, args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim) == (True, 16, 8, 16)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias, args.moe_router_num_groups,
            args.moe_router_group_topk, args.moe_router_topk_scaling_factor, args.moe_shared_expert_intermediate_size,
            args.moe_layer_freq) == ("sigmoid", True, 4, 2, 2.5, 32, [0, 1, 1, 1])
    assert state["model"]["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert args.rope_type == ("yarn" if "rope_scaling" in overrides else "rope")
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(megatron / "iter_0000001", tokens, te_names=impl != "local")
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    assert_back_and_from_args(source, megatron, model, tokens, tmp_path)


def test_pipeline_and_expert_parallel_bf16_round_trip(tmp_path):
    """TP 2 x PP 2 x EP 2 per-rank files and torch_dist, bf16: back to HF bit-exact (the bias stays float32);
    torch_dist with the local spec loads into megatron-core's dist_checkpointing with the logits."""
    source = tmp_path / "hf"
    make_model(source, torch.bfloat16)
    to_mcore(source, tmp_path / "ranks", "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2,
             "--target-expert-parallel-size", 2)
    assert len(list((tmp_path / "ranks" / "iter_0000001").iterdir())) == 8
    to_hf(tmp_path / "ranks", tmp_path / "back")
    assert_bit_identical(source, tmp_path / "back")
    to_mcore(source, tmp_path / "dist", "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    to_hf(tmp_path / "dist", tmp_path / "dist-back")
    assert_bit_identical(source, tmp_path / "dist-back")


def test_torch_dist_loads_in_megatron_core(tmp_path):
    source, dist = tmp_path / "hf", tmp_path / "dist"
    model = make_model(source)
    to_mcore(source, dist, "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    tokens = tokens_for(VOCAB)
    logits = dist_logits(dist / "iter_0000001", tokens, tp=2)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_a_checkpoint_megatron_core_made_converts_to_deepseek_v3(tmp_path):
    """megatron-core's own MLA MoE model (random, no HF origin): its args say MLA, so the saver writes a
    DeepseekV3ForCausalLM, which gives megatron-core's logits in transformers."""
    tokens = tokens_for(VOCAB)
    iter_dir, expected = save_mcore_checkpoint(
        tmp_path / "mcore", tokens=tokens, tp=2, num_layers=3, num_attention_heads=4, norm_epsilon=1e-6,
        multi_latent_attention=True, qk_layernorm=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, rope_type="rope", num_experts=8, moe_router_topk=4,
        moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1], moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32, moe_router_dtype="fp32")
    to_hf(tmp_path / "mcore", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert (config["model_type"], config["first_k_dense_replace"], config["n_shared_experts"]) == ("deepseek_v3", 1, 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(model, tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)


def test_bad_mla_input_is_one_line(tmp_path):
    source = tmp_path / "hf"
    make_model(source)
    config = read_config(source)
    (source / "config.json").write_text(json.dumps(dict(config, topk_group=1)))  # HF: top 2 of a group; Megatron: top 4
    assert "topk_group 1 with num_experts_per_tok 4" in error_line(to_mcore(source, tmp_path / "o1", ok=False))
    (source / "config.json").write_text(json.dumps(dict(config, norm_topk_prob=False)))
    assert "norm_topk_prob=false with sigmoid scores has no Megatron-Core equivalent" in \
        error_line(to_mcore(source, tmp_path / "o2", ok=False))
    (source / "config.json").write_text(json.dumps(dict(config, rope_parameters=dict(YARN, rope_theta=1e4,
                                                                                      attention_factor=1.2))))
    assert "yarn attention_factor / truncate=false have no Megatron-Core equivalent" in \
        error_line(to_mcore(source, tmp_path / "o3", ok=False))
    (source / "config.json").write_text(json.dumps(config))
    process = convert("--loader", "hf", "--saver", "megatron", "--load-dir", source, "--save-dir", tmp_path / "o4",
                      ok=False)
    assert "multi_latent_attention cannot be written as legacy" in error_line(process)
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


# MiniCPM3's shape (MLA with rotate-half rope, muP scalars, LongRoPE, tied), scaled down.
MINICPM3 = dict(BASE, num_key_value_heads=4, rms_norm_eps=1e-6, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, scale_emb=12, scale_depth=1.4, dim_model_base=16,
                tie_word_embeddings=True, max_position_embeddings=256,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
                                 "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.0, 1.6, 2.9, 5.3]})


def test_minicpm3_logits_with_mup_in_megatron_core_and_bit_exact_back(tmp_path):
    """MiniCPM3 through --loader minicpm_hf: megatron-core with the muP multipliers and LongRoPE factors
    from the written args gives transformers' MiniCPM3 logits; back with --saver hf, bit-exact."""
    source, megatron = tmp_path / "hf", tmp_path / "mcore"
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(transformers.MiniCPM3Config(**MINICPM3)), 0).eval()
    model.save_pretrained(source)
    convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local")
    args = torch.load(megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert (args.scale_emb, args.scale_depth, args.dim_model_base, args.short_factor) == (12, 1.4, 16,
                                                                                         [1.0, 1.3, 2.1, 3.7])
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    assert_back_and_from_args(source, megatron, model, tokens, tmp_path)
