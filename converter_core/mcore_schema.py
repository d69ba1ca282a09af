"""Megatron-Core GPTModel parameter names for each message key, in both name styles, with the
tensor-parallel rule of each. The per-rank torch format and torch_dist share this table.
"""

import collections

import torch

from converter_core import layout

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm"
OUTPUT_LAYER = "output_layer.weight"
OUTPUT_LAYER_EXTRA_STATE = "output_layer._extra_state"

# Names from a hand-written TE checkpoint that differ from the local spec.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}

Entry = collections.namedtuple("Entry", "keys name kind")
"""keys: message keys (two for SwiGLU fc1: W then V); name: parameter name inside decoder.layers.N; kind: TP rule."""


def layer_entries(args, impl):
    """The tensors of one transformer layer for a model described by Megatron args."""
    norm_bias = args.normalization == "LayerNorm"
    entries = [Entry(("input norm weight",), "input_layernorm.weight", layout.REPLICATED)]
    if norm_bias:
        entries.append(Entry(("input norm bias",), "input_layernorm.bias", layout.REPLICATED))
    entries.append(Entry(("qkv weight",), "self_attention.linear_qkv.weight", layout.COLUMN))
    if args.add_qkv_bias or args.add_bias_linear:
        entries.append(Entry(("qkv bias",), "self_attention.linear_qkv.bias", layout.COLUMN))
    entries.append(Entry(("dense weight",), "self_attention.linear_proj.weight", layout.ROW))
    if args.add_bias_linear:
        entries.append(Entry(("dense bias",), "self_attention.linear_proj.bias", layout.REPLICATED))
    entries.append(Entry(("post norm weight",), "pre_mlp_layernorm.weight", layout.REPLICATED))
    if norm_bias:
        entries.append(Entry(("post norm bias",), "pre_mlp_layernorm.bias", layout.REPLICATED))
    if args.swiglu:
        entries.append(Entry(("mlp l0 weight W", "mlp l0 weight V"), "mlp.linear_fc1.weight", layout.SWIGLU))
        if args.add_bias_linear:
            entries.append(Entry(("mlp l0 bias W", "mlp l0 bias V"), "mlp.linear_fc1.bias", layout.SWIGLU))
    else:
        entries.append(Entry(("mlp l0 weight",), "mlp.linear_fc1.weight", layout.COLUMN))
        if args.add_bias_linear:
            entries.append(Entry(("mlp l0 bias",), "mlp.linear_fc1.bias", layout.COLUMN))
    entries.append(Entry(("mlp l1 weight",), "mlp.linear_fc2.weight", layout.ROW))
    if args.add_bias_linear:
        entries.append(Entry(("mlp l1 bias",), "mlp.linear_fc2.bias", layout.REPLICATED))
    if impl == TRANSFORMER_ENGINE:
        entries = [e._replace(name=_TE_NAMES.get(e.name, e.name)) for e in entries]
    return entries


def layer_extra_states(impl):
    """`_extra_state` entries a real model's state dict has per layer: None for Megatron's own linears,
    an empty uint8 tensor for TransformerEngine modules (what TE returns without FP8)."""
    if impl == TRANSFORMER_ENGINE:
        modules = ["self_attention.core_attention", "self_attention.linear_qkv", "self_attention.linear_proj",
                   "mlp.linear_fc1", "mlp.linear_fc2"]
        return {f"{m}._extra_state": torch.empty(0, dtype=torch.uint8) for m in modules}
    modules = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    return {f"{m}._extra_state": None for m in modules}


def layer_key(index, name):
    return f"decoder.layers.{index}.{name}"


def detect_impl(keys):
    """Name style of a state dict, from its first layer's attention norm."""
    return TRANSFORMER_ENGINE if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else LOCAL


def final_norm_names(args):
    names = {"weight": f"{FINAL_NORM}.weight"}
    if args.normalization == "LayerNorm":
        names["bias"] = f"{FINAL_NORM}.bias"
    return names
