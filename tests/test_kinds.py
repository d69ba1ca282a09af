"""Each tensor kind of the SDK maps HF tensors to message tensors and back exactly: to_hf(to_megatron(x))
gives x bit for bit, with the shapes hf_shapes promises, for every built-in kind and the gpt_oss plugin's."""

import argparse

import pytest
import torch

from converter_core import layout, plugin, protocol
from converter_core.megatron.args import make_args
from converter_plugins import gpt_oss  # its kinds, and the expert bias keys it registers


def model_args(**fields):
    base = dict(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, max_position_embeddings=64, norm_epsilon=1e-5, rotary_base=10000.0, vocab_size=32,
                params_dtype=torch.float32)
    return make_args(**{**base, **fields})


MOE = dict(num_experts=3, moe_router_topk=2, moe_ffn_hidden_size=24)
MLA = dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=24, kv_lora_rank=20, qk_head_dim=8, qk_pos_emb_head_dim=6,
           v_head_dim=10)
Q, K, V = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
CASES = {
    "copy": (plugin.Tensor("self_attn.o_proj.weight", "dense weight"), {}),
    "qkv": (plugin.Tensor((Q, K, V), "qkv weight", plugin.QKV), {}),
    "qkv bias": (plugin.Tensor(tuple(n.replace("weight", "bias") for n in (Q, K, V)), "qkv bias", plugin.QKV),
                 dict(add_qkv_bias=True)),
    "fused qkv": (plugin.Tensor("self_attn.qkv_proj.weight", "qkv weight", plugin.FUSED_QKV), {}),
    "fused gate/up": (plugin.Tensor("mlp.gate_up_proj.weight", ("mlp l0 weight W", "mlp l0 weight V"),
                                    plugin.FUSED_GATE_UP), {}),
    "experts": (plugin.Tensor(("mlp.experts.{}.w1.weight", "mlp.experts.{}.w3.weight"),
                              ("mlp l0 weight W", "mlp l0 weight V"), plugin.EXPERTS), MOE),
    "mla query, interleaved": (plugin.Tensor("self_attn.q_b_proj.weight", "q up weight", plugin.MLA_Q), MLA),
    "mla kv down, interleaved": (plugin.Tensor("self_attn.kv_a_proj_with_mqa.weight", "kv down weight",
                                               plugin.MLA_KV_DOWN), MLA),
    "mla query, rotate-half": (plugin.Tensor("self_attn.q_b_proj.weight", "q up weight", plugin.MLA_Q), MLA),
    "mla kv down, rotate-half": (plugin.Tensor("self_attn.kv_a_proj_with_mqa.weight", "kv down weight",
                                               plugin.MLA_KV_DOWN), MLA),
    "gpt_oss interleaved gate/up": (plugin.Tensor("mlp.experts.gate_up_proj", ("mlp l0 weight W", "mlp l0 weight V"),
                                                  gpt_oss.INTERLEAVED_GATE_UP), MOE),
    "gpt_oss interleaved gate/up bias": (plugin.Tensor("mlp.experts.gate_up_proj_bias",
                                                       ("experts l0 bias W", "experts l0 bias V"),
                                                       gpt_oss.INTERLEAVED_GATE_UP), dict(MOE, add_bias_linear=True)),
    "gpt_oss transposed experts": (plugin.Tensor("mlp.experts.down_proj", "mlp l1 weight", gpt_oss.TRANSPOSED_EXPERTS),
                                   MOE),
}


def whole(value):
    return layout.assemble(value) if isinstance(value, tuple) else layout.tensor_of(value)


@pytest.mark.parametrize("case", CASES)
def test_to_hf_inverts_to_megatron(case):
    row, fields = CASES[case]
    args = model_args(**fields)
    family = plugin.Family("example", ("ExampleForCausalLM",), layer=(row,),
                           mla=plugin.Mla(rope_interleaved="rotate-half" not in case)
                           if fields.get("multi_latent_attention") else None)
    shapes = protocol.layer_message_shapes(args, 0)
    generator = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=generator) for name, shape in row.kind.hf_shapes(row, shapes, args)}
    assert hf, case
    if "gpt_oss" in case:  # stacked experts: [E, ., .] weights, [E, .] biases
        assert {tensor.dim() for tensor in hf.values()} == {2 if "bias" in case else 3}, case
    message = row.kind.to_megatron(row, hf, args, family)
    assert sorted(message) == sorted(row.keys)
    for key, tensor in message.items():
        assert tuple(tensor.shape) == shapes[key], (key, tensor.shape, shapes[key])
    if "rotate-half" in case or "gpt_oss" in case:  # the kind really moves values (else the inverse test proves nothing)
        first = message[row.keys[0]].flatten()
        assert not torch.equal(first, hf[row.hf].flatten()[:first.numel()])
    back = row.kind.to_hf(row, dict(message), args, family)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(whole(back[name]), tensor), name


def test_a_plugin_kind_is_used_both_ways():
    """A kind a plugin defines (here: norm weights stored minus one) runs in the same places as the
    built-in ones."""
    class OffsetNorm(plugin.Kind):
        def to_megatron(self, row, hf, args, family):
            return {row.key: hf[row.hf] + 1}

        def to_hf(self, row, message, args, family):
            return {row.hf: layout.tensor_of(message.pop(row.key)) - 1}

    row = plugin.Tensor("input_layernorm.weight", "input norm weight", OffsetNorm())
    args = model_args()
    hf = {"input_layernorm.weight": torch.full((64,), 0.25)}
    message = row.kind.to_megatron(row, hf, args, argparse.Namespace())
    assert torch.equal(message["input norm weight"], torch.full((64,), 1.25))
    assert torch.equal(row.kind.to_hf(row, message, args, argparse.Namespace())["input_layernorm.weight"], hf[row.hf])
