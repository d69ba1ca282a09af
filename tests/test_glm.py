"""GLM-4.5 (q/k norms, expert groups, an MTP layer) and GLM-4.5-Air (no q/k norms, one group, no MTP)
through the generic `hf` plugins: partial rotary, q/k/v biases, head_dim set apart, first layers dense,
sigmoid routing with a score-correction bias, routed scaling and shared experts. HF -> mcore at TP 2 x EP 2
gives transformers' logits in megatron-core run at TP 2 x EP 2 (and GLM-4.5's MTP layer the logits of the
MTP computation); back to HF is bit-exact with the same config.json."""

import shutil

import pytest
import torch
import transformers

from helpers import BASE, assert_bit_identical, convert, hf_logits, randomize, read_config, tokens_for
from mcore_harness import mcore_logits
from test_mtp import add_mtp_layer, mtp_reference_logits

VOCAB = BASE["vocab_size"]
# GLM-4.5's shape scaled down: head_dim 32 (not hidden / heads), half of it rotated, biases on q/k/v, q/k
# norms, one dense layer; topk = 2 x topk_group, as Megatron-Core's group scores need; one MTP layer as the
# releases store it (layer num_hidden_layers).
GLM45 = dict(BASE, num_hidden_layers=3, head_dim=32, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
             n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=32,
             n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             num_nextn_predict_layers=1)
# GLM-4.5-Air's: no q/k norms, one expert group, no routed scaling, no MTP layer.
AIR = dict(GLM45, use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=0)
MODELS = {"glm45": GLM45, "air": AIR}


def make_model(folder, fields):
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(transformers.Glm4MoeConfig(**fields)), 0).eval()
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers[fields["first_k_dense_replace"]:]:  # a bias that changes which experts are chosen
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(fields["n_routed_experts"], generator=generator) * 0.1)
    model.save_pretrained(folder)
    return model


def to_mcore(source, target, *flags):
    return convert("--loader", "hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
                   "--saver-transformer-impl", "local", *flags)


def to_hf(source, target, *flags, ok=True):
    return convert("--loader", "mcore", "--saver", "hf", "--load-dir", source, "--save-dir", target, *flags, ok=ok)


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request, tmp_path_factory):
    """(fields, model, HF folder, TP 2 x EP 2 checkpoint, work folder, MTP layer or None)."""
    work = tmp_path_factory.mktemp(request.param)
    fields, source = MODELS[request.param], work / "hf"
    model = make_model(source, fields)
    mtp = add_mtp_layer(source, model, work / "deeper") if fields["num_nextn_predict_layers"] else None
    to_mcore(source, work / "ep2", "--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 2)
    return fields, model, source, work / "ep2", work, mtp


def test_megatron_lm_args(converted):
    """Megatron-LM's own arg names, so Megatron-LM trains from what is written."""
    fields, _, _, ep2, _, _ = converted
    args = torch.load(ep2 / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)["args"]
    grouped = fields["n_group"] > 1
    assert (args.rotary_percent, args.kv_channels, args.add_qkv_bias, args.add_bias_linear, args.qk_layernorm) == \
        (0.5, 32, True, False, fields["use_qk_norm"])
    assert args.mtp_num_layers == (fields["num_nextn_predict_layers"] or None)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size, args.moe_layer_freq,
            args.moe_router_score_function, args.moe_router_enable_expert_bias, args.moe_router_pre_softmax,
            args.moe_router_num_groups, args.moe_router_group_topk, args.moe_router_topk_scaling_factor,
            args.moe_shared_expert_intermediate_size, args.expert_model_parallel_size) == \
        (8, 4, 32, [0, 1, 1], "sigmoid", True, False, 4 if grouped else None, 2 if grouped else None,
         fields["routed_scaling_factor"], 32, 2)


def test_logits_in_megatron_core(converted):
    _, model, _, ep2, _, mtp = converted
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(ep2 / "iter_0000001", tokens, mtp=mtp is not None, ep=2)
    if mtp is not None:
        logits, mtp_logits = logits
        torch.testing.assert_close(mtp_logits[0][..., :VOCAB], mtp_reference_logits(model, mtp, tokens), atol=1e-4,
                                   rtol=0)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_back_to_hf_bit_exact(converted):
    _, _, source, ep2, work, _ = converted
    to_hf(ep2, work / "back")
    assert_bit_identical(source, work / "back")
    assert read_config(work / "back") == read_config(source)


def test_a_checkpoint_without_its_hf_config_is_written_as_glm(converted):
    """With the HF config deleted from the args (as if Megatron-LM had made the checkpoint), the saver
    picks glm4_moe from the args alone (partial rotary, sigmoid routing) and writes the same model."""
    fields, model, _, ep2, work, _ = converted
    megatron = shutil.copytree(ep2, work / "no-hf-config")
    for rank in (megatron / "iter_0000001").glob("*/model_optim_rng.pt"):
        state = torch.load(rank, weights_only=False)
        del state["args"].hf_config_json, state["args"].hf_source_dir
        torch.save(state, rank)
    to_hf(megatron, work / "from-args")
    config = read_config(work / "from-args")
    assert (config["model_type"], config["use_qk_norm"], config["num_nextn_predict_layers"]) == \
        ("glm4_moe", fields["use_qk_norm"], fields["num_nextn_predict_layers"])
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(work / "from-args").eval()
    tokens = tokens_for(VOCAB)
    torch.testing.assert_close(hf_logits(rebuilt, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
