"""gpt-oss (GptOssForCausalLM) through the generic `hf` plugins: attention sinks, biases everywhere,
stacked experts with gate and up interleaved, the clamped quick-GELU GLU with offset, sliding windows on
alternate layers and YaRN rope. megatron-core's GPTModel with the converted weights gives transformers'
logits (TP 2: experts whole on every rank); HF -> mcore -> HF is bit-exact."""

import pytest
import torch
import transformers

from helpers import BASE, assert_bit_identical, read_config, read_safetensors_folder
from test_moe import assert_mcore_logits, make_model, to_hf, to_mcore

# sliding_window 3 so that the 8-token check sees the window; yarn with truncate=false as released
GPT_OSS = dict(BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=3,
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})


@pytest.fixture(scope="module")
def bf16_tp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    source, megatron, back = folder / "hf", folder / "mcore", folder / "back"
    model = make_model(source, transformers.GptOssConfig(**GPT_OSS), torch.bfloat16)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2)
    to_hf(megatron, back)
    return source, megatron, back, model


def test_bf16_round_trip_is_bit_exact(bf16_tp2):
    source, _, back, _ = bf16_tp2
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_experts_whole_on_every_tp_rank(bf16_tp2):
    """Gate and up de-interleaved into Megatron's [W; V] fc1, down transposed into fc2; both TP ranks hold
    every expert whole (expert_tensor_parallel_size 1); sinks split with the heads."""
    source, megatron, _, _ = bf16_tp2
    hf = read_safetensors_folder(source)
    prefix = "model.layers.1."
    gate_up, down = hf[prefix + "mlp.experts.gate_up_proj"][2], hf[prefix + "mlp.experts.down_proj"][2]
    bias = hf[prefix + "mlp.experts.gate_up_proj_bias"][2]
    for rank in range(2):
        state = torch.load(megatron / "iter_0000001" / f"mp_rank_0{rank}" / "model_optim_rng.pt", weights_only=False)
        assert state["args"].expert_tensor_parallel_size == 1 and state["args"].softmax_type == "learnable"
        model = state["model"]
        experts = "decoder.layers.1.mlp.experts.local_experts.2."
        assert torch.equal(model[experts + "linear_fc1.weight"], torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T]))
        assert torch.equal(model[experts + "linear_fc1.bias"], torch.cat([bias[0::2], bias[1::2]]))
        assert torch.equal(model[experts + "linear_fc2.weight"], down.T)
        assert torch.equal(model["decoder.layers.1.self_attention.core_attention.softmax_offset"],
                           hf[prefix + "self_attn.sinks"][2 * rank:2 * rank + 2])


def test_logits_in_megatron_core(bf16_tp2):
    _, megatron, _, model = bf16_tp2
    assert_mcore_logits(megatron / "iter_0000001", model)
