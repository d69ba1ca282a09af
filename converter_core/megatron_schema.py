"""Where each message tensor lives in a Megatron checkpoint's `model` dict, and its tensor-parallel
rule: Megatron-Core GPTModel (TransformerEngine or local names, flat keys) and the legacy Megatron-LM
GPT model (nested dicts). Paths are tuples of dict keys. The per-rank and torch_dist formats share this.
"""

import collections
import re

import torch

from converter_core import layout, megatron_args
from converter_core.errors import require

FORMATS = ("torch", "torch_dist", "legacy")  # per-rank Megatron-Core files, Megatron-Core distributed, legacy GPT
# Model settings (Megatron args) a format cannot hold, and why; savers refuse them, supported() reports them.
FORMAT_LIMITS = {"legacy": {"multi_latent_attention": "legacy Megatron-LM has no multi-latent attention",
                            "qk_layernorm": "legacy Megatron-LM has no q/k norms",
                            "num_experts": "legacy mixture-of-experts checkpoints are not written here"}}

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"

Entry = collections.namedtuple("Entry", "keys name kind experts", defaults=(False,))
"""keys: message keys (two for SwiGLU fc1: W then V); name: parameter name inside one layer ("{}" for the
local expert number); kind: TP rule; experts: the message holds one tensor per expert, stacked."""


def layer_entries(args, index=0, names=None, grouped=False, te=False):
    """The tensors of transformer layer `index`, under Megatron-Core local names unless `names` renames
    them (a MoE layer keeps pre_mlp_layernorm under its own name in every spec); `grouped`: experts as
    TransformerEngine's TEGroupedMLP names them; `te`: TransformerEngine's spec (MLA differs there)."""
    moe = megatron_args.moe_layers(args)[index]
    mla = getattr(args, "multi_latent_attention", False)
    norm_bias = args.normalization == "LayerNorm"
    entries = [Entry(("input norm weight",), "input_layernorm.weight", layout.REPLICATED)]
    if norm_bias:
        entries.append(Entry(("input norm bias",), "input_layernorm.bias", layout.REPLICATED))
    if mla:
        entries += mla_entries(args, te)
    else:
        entries.append(Entry(("qkv weight",), "self_attention.linear_qkv.weight", layout.COLUMN))
    if not mla and (args.add_qkv_bias or args.add_bias_linear):
        entries.append(Entry(("qkv bias",), "self_attention.linear_qkv.bias", layout.COLUMN))
    if getattr(args, "qk_layernorm", False) and not mla:  # per-head norms: head_dim wide, the same on every rank
        entries.append(Entry(("q norm weight",), "self_attention.q_layernorm.weight", layout.REPLICATED))
        entries.append(Entry(("k norm weight",), "self_attention.k_layernorm.weight", layout.REPLICATED))
        if norm_bias:
            entries.append(Entry(("q norm bias",), "self_attention.q_layernorm.bias", layout.REPLICATED))
            entries.append(Entry(("k norm bias",), "self_attention.k_layernorm.bias", layout.REPLICATED))
    entries.append(Entry(("dense weight",), "self_attention.linear_proj.weight", layout.ROW))
    if args.add_bias_linear:
        entries.append(Entry(("dense bias",), "self_attention.linear_proj.bias", layout.REPLICATED))
    entries.append(Entry(("post norm weight",), "pre_mlp_layernorm.weight", layout.REPLICATED))
    if norm_bias:
        entries.append(Entry(("post norm bias",), "pre_mlp_layernorm.bias", layout.REPLICATED))
    if moe:
        entries += moe_entries(args, grouped)
    elif args.swiglu:
        entries.append(Entry(("mlp l0 weight W", "mlp l0 weight V"), "mlp.linear_fc1.weight", layout.SWIGLU))
        if args.add_bias_linear:
            entries.append(Entry(("mlp l0 bias W", "mlp l0 bias V"), "mlp.linear_fc1.bias", layout.SWIGLU))
    else:
        entries.append(Entry(("mlp l0 weight",), "mlp.linear_fc1.weight", layout.COLUMN))
        if args.add_bias_linear:
            entries.append(Entry(("mlp l0 bias",), "mlp.linear_fc1.bias", layout.COLUMN))
    if not moe:
        entries.append(Entry(("mlp l1 weight",), "mlp.linear_fc2.weight", layout.ROW))
        if args.add_bias_linear:
            entries.append(Entry(("mlp l1 bias",), "mlp.linear_fc2.bias", layout.REPLICATED))
    names = {k: v for k, v in (names or {}).items() if not (moe and k.startswith("pre_mlp_layernorm."))
             and not (mla and k.startswith("input_layernorm."))}  # MLA's spec keeps a separate input norm
    if mla and te:
        names.update(_TE_MLA_NAMES)
    return [e._replace(name=names.get(e.name, e.name)) for e in entries]


def mla_entries(args, te=False):
    """Multi-latent attention as megatron-core's MLASelfAttention names it. The latent norms exist with
    qk_layernorm (TransformerEngine fuses them into the up projections); the down projections are whole
    on every rank in TransformerEngine's spec (TELinear, duplicated) and split over TP in the local one."""
    require(getattr(args, "qk_layernorm", False),
            "multi-latent attention without qk_layernorm (no latent norms) is not supported")
    require(not args.add_bias_linear and not args.add_qkv_bias, "multi-latent attention with linear biases is not supported")
    down = layout.REPLICATED if te else layout.COLUMN
    if args.q_lora_rank:
        query = [Entry(("q down weight",), "self_attention.linear_q_down_proj.weight", down),
                 Entry(("q latent norm weight",), "self_attention.q_layernorm.weight", layout.REPLICATED),
                 Entry(("q up weight",), "self_attention.linear_q_up_proj.weight", layout.COLUMN)]
    else:
        query = [Entry(("q weight",), "self_attention.linear_q_proj.weight", layout.COLUMN)]
    return query + [Entry(("kv down weight",), "self_attention.linear_kv_down_proj.weight", down),
                    Entry(("kv latent norm weight",), "self_attention.kv_layernorm.weight", layout.REPLICATED),
                    Entry(("kv up weight",), "self_attention.linear_kv_up_proj.weight", layout.COLUMN)]


def moe_entries(args, grouped=False):
    """A MoE layer's MLP as Megatron-Core's local and TransformerEngine specs name it: the router, each
    expert's SwiGLU fc1 and fc2 (split over TP like the dense MLP; SequentialMLP's
    `local_experts.{j}.linear_fc1.weight`, or TEGroupedMLP's `linear_fc1.weight{j}`), shared experts."""
    require(args.swiglu and not args.add_bias_linear, "mixture-of-experts layers need SwiGLU without linear biases")
    fc1, fc2 = ("mlp.experts.linear_fc1.weight{}", "mlp.experts.linear_fc2.weight{}") if grouped else \
        ("mlp.experts.local_experts.{}.linear_fc1.weight", "mlp.experts.local_experts.{}.linear_fc2.weight")
    entries = [Entry(("router weight",), "mlp.router.weight", layout.REPLICATED)]
    if getattr(args, "moe_router_enable_expert_bias", False):
        entries.append(Entry(("router expert bias",), "mlp.router.expert_bias", layout.REPLICATED))
    entries += [Entry(("mlp l0 weight W", "mlp l0 weight V"), fc1, layout.SWIGLU, True),
               Entry(("mlp l1 weight",), fc2, layout.ROW, True)]
    if getattr(args, "moe_shared_expert_intermediate_size", None):
        entries += [Entry(("shared mlp l0 weight W", "shared mlp l0 weight V"), "mlp.shared_experts.linear_fc1.weight",
                          layout.SWIGLU),
                    Entry(("shared mlp l1 weight",), "mlp.shared_experts.linear_fc2.weight", layout.ROW)]
    return entries


_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
# MLA in TransformerEngine's spec: the latent norms fused into the up projections, input norm separate.
_TE_MLA_NAMES = {
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}

_LEGACY_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "input_layernorm.bias": "input_norm.bias",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "self_attention.linear_proj.bias": "self_attention.dense.bias",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "pre_mlp_layernorm.bias": "post_attention_norm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}

# Spellings of older legacy checkpoints, and what Megatron-LM renamed them to at load time.
_LEGACY_RESPELLINGS = [("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attention_norm"),
                       ("final_layernorm", "final_norm"), (".attention.", ".self_attention.")]

_CORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LEGACY_LAYER = re.compile(r"^layers\.(\d+)\.")


class CoreSchema:
    """Megatron-Core GPTModel.state_dict(): flat keys, layer numbers local to the pipeline stage."""

    legacy = False
    word_embeddings = ("embedding.word_embeddings.weight",)
    output_layer = ("output_layer.weight",)
    tied_output_layer = ("output_layer.weight",)  # last stage of a tied model with PP > 1

    def __init__(self, impl):
        self.impl = impl
        self.names = _TE_NAMES if impl == TRANSFORMER_ENGINE else None

    def final_norm(self, key):
        return (f"decoder.final_layernorm.{key}",)

    def layer(self, index, name):
        return (f"decoder.layers.{index}.{name}",)

    def grouped(self, args):
        """Whether experts are TEGroupedMLP's (TransformerEngine with moe_grouped_gemm); the local
        spec's GroupedMLP (one fused weight1 / weight2) is not supported."""
        grouped = bool(getattr(args, "moe_grouped_gemm", False) and getattr(args, "num_experts", None))
        require(not grouped or self.impl == TRANSFORMER_ENGINE,
                "moe_grouped_gemm with local names (GroupedMLP's fused weight1 / weight2) is not supported; use "
                "TransformerEngine names")
        return grouped

    def entries(self, args, index=0):
        return layer_entries(args, index, self.names, self.grouped(args), te=self.impl == TRANSFORMER_ENGINE)

    def layer_values(self, args, index=0, local_experts=0):
        """`_extra_state` entries a real model has per layer: None for Megatron's own linears, an empty
        uint8 tensor for TransformerEngine modules (what TE >= 2.4 returns without FP8)."""
        if megatron_args.moe_layers(args)[index] and self.grouped(args):
            mlp = ["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"]  # one GroupedLinear each
        elif megatron_args.moe_layers(args)[index]:
            mlp = [f"mlp.experts.local_experts.{j}.{linear}" for j in range(local_experts)
                   for linear in ("linear_fc1", "linear_fc2")]
            if getattr(args, "moe_shared_expert_intermediate_size", None):
                mlp += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        else:
            mlp = ["mlp.linear_fc1", "mlp.linear_fc2"]
        if not getattr(args, "multi_latent_attention", False):
            attention = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        elif args.q_lora_rank:
            attention = [f"self_attention.linear_{name}" for name in ("q_down_proj", "q_up_proj", "kv_down_proj",
                                                                       "kv_up_proj", "proj")]
        else:
            attention = [f"self_attention.linear_{name}" for name in ("q_proj", "kv_down_proj", "kv_up_proj", "proj")]
        if self.impl == TRANSFORMER_ENGINE:
            modules = ["self_attention.core_attention", *attention, *mlp]
            return {f"{m}._extra_state": torch.empty(0, dtype=torch.uint8) for m in modules}
        return {f"{m}._extra_state": None for m in attention + mlp}

    def last_stage_values(self):
        return {("output_layer._extra_state",): None}

    def layer_indices(self, model):
        return {int(m.group(1)) for k in model if (m := _CORE_LAYER.match(k))}

    @staticmethod
    def normalize(model):
        return model


class LegacySchema:
    """Legacy Megatron-LM GPTModel: nested `language_model` dicts, local (non-TE) names."""

    legacy = True
    impl = LOCAL
    word_embeddings = ("language_model", "embedding", "word_embeddings", "weight")
    output_layer = ("language_model", "output_layer", "weight")
    tied_output_layer = ("word_embeddings_for_head", "weight")

    def final_norm(self, key):
        return ("language_model", "encoder", f"final_norm.{key}")

    def layer(self, index, name):
        return ("language_model", "encoder", f"layers.{index}.{name}")

    def entries(self, args, index=0):
        return layer_entries(args, index, _LEGACY_NAMES)

    def layer_values(self, args, index=0, local_experts=0):
        return {}

    def last_stage_values(self):
        return {}

    def layer_indices(self, model):
        encoder = model.get("language_model", {}).get("encoder", {})
        return {int(m.group(1)) for k in encoder if (m := _LEGACY_LAYER.match(k))}

    @staticmethod
    def normalize(model):
        """A view with today's spellings (`encoder`, `input_norm`, ...), as Megatron-LM renamed at load."""
        language_model = dict(model.get("language_model", {}))
        if "transformer" in language_model and "encoder" not in language_model:
            language_model["encoder"] = language_model.pop("transformer")
        encoder = {}
        for key, value in language_model.get("encoder", {}).items():
            for old, new in _LEGACY_RESPELLINGS:
                key = key.replace(old, new)
            encoder[key] = value
        language_model["encoder"] = encoder
        return dict(model, language_model=language_model)


# The local spec's sharded_state_dict_keys_map (not in its MLA layers): torch_dist holds its norms under
# TransformerEngine's fused names.
_LOCAL_DIST_RENAMES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                       ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


def dist_layer_key(name, local_spec=False):
    """The torch_dist key of a layer parameter `name` (as the spec's own state dict names it): layers
    stacked under one key; a local non-MLA spec's norms renamed as its keys map says; experts of either
    MLP class under `mlp.experts.experts.*` (TEGroupedMLP's keys are made to match SequentialMLP's)."""
    for old, new in _LOCAL_DIST_RENAMES if local_spec else ():
        if name.startswith(old):
            name = new + name[len(old):]
    name = re.sub(r"^mlp\.experts\.(?:local_experts\.\{\}\.(linear_fc[12])\.weight|(linear_fc[12])\.weight\{\})$",
                  lambda m: f"mlp.experts.experts.{m.group(1) or m.group(2)}.weight", name)
    return "decoder.layers." + name


def dist_layer_candidates(args, index):
    """Per local-spec entry of layer `index`, the torch_dist keys it may be under: as a checkpoint of
    TransformerEngine's spec or of the local spec holds it (they differ for MoE and MLA norms)."""
    mla = getattr(args, "multi_latent_attention", False)
    local, te = layer_entries(args, index), layer_entries(args, index, _TE_NAMES, te=True)
    return [(entry, list(dict.fromkeys((dist_layer_key(te_entry.name), dist_layer_key(entry.name, not mla)))))
            for entry, te_entry in zip(local, te)]


DIST_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                            "self_attention.linear_q_proj", "self_attention.linear_q_down_proj",
                            "self_attention.linear_q_up_proj", "self_attention.linear_kv_down_proj",
                            "self_attention.linear_kv_up_proj", "mlp.shared_experts.linear_fc1",
                            "mlp.shared_experts.linear_fc2")


def detect(model):
    """The schema of a loaded `model` dict."""
    if "language_model" in model:
        return LegacySchema()
    te = any(k.endswith(("linear_qkv.layer_norm_weight", "linear_kv_up_proj.layer_norm_weight")) for k in model)
    return CoreSchema(TRANSFORMER_ENGINE if te else LOCAL)


def lookup(model, path):
    for key in path:
        if not isinstance(model, dict) or key not in model:
            return None
        model = model[key]
    return model


def place(model, path, value):
    for key in path[:-1]:
        model = model.setdefault(key, {})
    model[path[-1]] = value
