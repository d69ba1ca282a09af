"""Where each message tensor lives in a Megatron checkpoint's `model` dict, and its tensor-parallel
rule: Megatron-Core GPTModel (TransformerEngine or local names, flat keys) and the legacy Megatron-LM
GPT model (nested dicts). Paths are tuples of dict keys. The per-rank and torch_dist formats share this.
"""

import collections
import re

import torch

from converter_core import layout
from converter_core.errors import require
from converter_core.megatron import args as megatron_args, keys as message_keys

FORMATS = ("torch", "torch_dist", "legacy")  # per-rank Megatron-Core files, Megatron-Core distributed, legacy GPT
# Model settings (Megatron args) a format cannot hold, and why; savers refuse them, supported() reports them.
FORMAT_LIMITS = {"legacy": {"mtp_num_layers": "legacy Megatron-LM has no multi-token prediction",
                            "multi_latent_attention": "legacy Megatron-LM has no multi-latent attention",
                            "qk_layernorm": "legacy Megatron-LM has no q/k norms",
                            "num_experts": "legacy mixture-of-experts checkpoints are not written here",
                            "experimental_attention_variant": "legacy Megatron-LM has no linear attention"}}

LOCAL, TRANSFORMER_ENGINE, LEGACY = message_keys.LOCAL, message_keys.TRANSFORMER_ENGINE, message_keys.LEGACY

Entry = collections.namedtuple("Entry", "keys name kind experts", defaults=(False,))
"""keys: message keys (two for SwiGLU fc1: W then V; more for a fused projection's parts); name: parameter
name inside one layer ("{}" for the local expert number); kind: TP rule; experts: the message holds one
tensor per expert, stacked."""


def part_rows(entry, shapes):
    """The full row counts of the parts of a parameter holding several keys (layout.SWIGLU), from the layer
    message's {key: shape}; None for one key or SwiGLU's two equal halves."""
    rows = [shapes[key][int(entry.experts)] for key in entry.keys]
    return rows if len(rows) > 2 or len(set(rows)) > 1 else None


def layer_entries(args, index=0, spec=LOCAL, grouped=False):
    """The parameters of transformer layer `index` as `spec` (LOCAL, TRANSFORMER_ENGINE or LEGACY) names
    them, each with the message keys it holds (message_keys' table); `grouped`: experts as
    TransformerEngine's TEGroupedMLP names them. Layer num_layers + i is multi-token-prediction layer i,
    its names inside mtp.layers.i."""
    keys_of, mtp = {}, index >= args.num_layers  # parameter name -> its keys, in table order
    for key in message_keys.layer_keys(args, index):
        keys_of.setdefault(key.parameter(spec, grouped, mtp), []).append(key)
    entries = []
    for name, keys in keys_of.items():
        split = keys[0].tp_split(spec)
        require(len(keys) >= 2 if split == layout.SWIGLU else len(keys) == 1,
                f"parameter {name} holds message keys {[key.name for key in keys]}: only parts split as SwiGLU's W "
                "and V (each over TP, rank r holding its slice of each) share one")
        entries.append(Entry(tuple(key.name for key in keys), name, split, keys[0].experts))
    return entries


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

    def final_norm(self, key):
        return (f"decoder.final_layernorm.{key}",)

    def layer(self, index, name):
        return (f"decoder.layers.{index}.{name}",)

    def layer_path(self, num_layers, index, local, name):
        """The path of parameter `name` of layer `index` (`local` within its pipeline stage); layer
        num_layers + i is multi-token-prediction layer i (on the last stage)."""
        return (f"mtp.layers.{index - num_layers}.{name}",) if index >= num_layers else self.layer(local, name)

    def grouped(self, args):
        """Whether experts are TEGroupedMLP's (TransformerEngine with moe_grouped_gemm); the local
        spec's GroupedMLP (one fused weight1 / weight2) is not supported."""
        grouped = bool(getattr(args, "moe_grouped_gemm", False) and getattr(args, "num_experts", None))
        require(not grouped or self.impl == TRANSFORMER_ENGINE,
                "moe_grouped_gemm with local names (GroupedMLP's fused weight1 / weight2) is not supported; use "
                "TransformerEngine names")
        return grouped

    def entries(self, args, index=0):
        return layer_entries(args, index, self.impl, self.grouped(args))

    def layer_values(self, args, index=0, local_experts=0):
        """`_extra_state` entries a real model has per layer: None for Megatron's own linears, an empty
        uint8 tensor for TransformerEngine modules (what TE >= 2.4 returns without FP8)."""
        moe = megatron_args.is_moe_layer(args, index)
        if moe and self.grouped(args):
            mlp = ["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"]  # one GroupedLinear each
        elif moe:
            mlp = [f"mlp.experts.local_experts.{j}.{linear}" for j in range(local_experts)
                   for linear in ("linear_fc1", "linear_fc2")]
            if getattr(args, "moe_shared_expert_intermediate_size", None):
                mlp += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        else:
            mlp = ["mlp.linear_fc1", "mlp.linear_fc2"]
        linear = megatron_args.is_linear_attention_layer(args, index)
        if linear:  # gated DeltaNet: no core attention module
            attention = ["self_attention.in_proj", "self_attention.out_proj"]
        elif not getattr(args, "multi_latent_attention", False):
            attention = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        elif args.q_lora_rank:
            attention = [f"self_attention.linear_{name}" for name in ("q_down_proj", "q_up_proj", "kv_down_proj",
                                                                       "kv_up_proj", "proj")]
        else:
            attention = [f"self_attention.linear_{name}" for name in ("q_proj", "kv_down_proj", "kv_up_proj", "proj")]
        modules = (["self_attention.core_attention"] if self.impl == TRANSFORMER_ENGINE and not linear else []) + \
            attention + mlp
        if index >= args.num_layers:  # an MTP layer: its projection, and its transformer layer's modules
            modules = ["eh_proj"] + [message_keys.MTP_TRANSFORMER_LAYER + module for module in modules]
        value = torch.empty(0, dtype=torch.uint8) if self.impl == TRANSFORMER_ENGINE else None
        return {f"{m}._extra_state": value for m in modules}

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

    def layer_path(self, num_layers, index, local, name):
        return self.layer(local, name)  # no MTP layers (FORMAT_LIMITS)

    def entries(self, args, index=0):
        return layer_entries(args, index, LEGACY)

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
    name = re.sub(r"^mlp\.experts\.(?:local_experts\.\{\}\.(linear_fc[12])\.(weight|bias)|"
                  r"(linear_fc[12])\.(weight|bias)\{\})$",
                  lambda m: f"mlp.experts.experts.{m.group(1) or m.group(3)}.{m.group(2) or m.group(4)}", name)
    return "decoder.layers." + name


def dist_mtp_key(mtp_index, name, local_spec=False):
    """The torch_dist key of parameter `name` of multi-token-prediction layer `mtp_index`: one key per
    layer (not stacked), its transformer layer's parameters renamed as a decoder layer's are."""
    prefix = f"mtp.layers.{mtp_index}."
    inner = name.removeprefix(message_keys.MTP_TRANSFORMER_LAYER)
    if inner == name:
        return prefix + name
    return prefix + message_keys.MTP_TRANSFORMER_LAYER + dist_layer_key(inner, local_spec).removeprefix("decoder.layers.")


def dist_parts(args, index, name, spec=LOCAL):
    """The tensors torch_dist stores parameter `name` of layer `index` (as `spec` names it) as: its entry's
    [(parameter name + "." + LayerKey.dist_part, message key)] when its keys name parts, else []."""
    mtp = index >= args.num_layers
    keys = [key for key in message_keys.layer_keys(args, index)
            if name in (key.parameter(spec, False, mtp), key.parameter(spec, True, mtp))]
    named = [key for key in keys if key.dist_part]
    require(not named or len(named) == len(keys), f"parameter {name}: only some of its keys "
                                                  f"{[key.name for key in keys]} name a torch_dist part")
    return [(f"{name}.{key.dist_part}", key.name) for key in named]


def _dist_entries(args, index, spec):
    """layer_entries as torch_dist holds them: a parameter stored as parts is one entry per part (its key,
    rows split over TP on their own)."""
    entries = []
    for entry in layer_entries(args, index, spec):
        parts = dist_parts(args, index, entry.name, spec)
        entries += [Entry((key,), name, layout.COLUMN) for name, key in parts] or [entry]
    return entries


def dist_layer_candidates(args, index):
    """Per local-spec entry of layer `index` (a part: see dist_parts), the torch_dist keys it may be under:
    as a checkpoint of TransformerEngine's spec or of the local spec holds it (they differ for MoE and MLA
    norms)."""
    mla = getattr(args, "multi_latent_attention", False)
    local, te = _dist_entries(args, index, LOCAL), _dist_entries(args, index, TRANSFORMER_ENGINE)
    if index >= args.num_layers:
        def key(name, local_spec=False):
            return dist_mtp_key(index - args.num_layers, name, local_spec)
    else:
        key = dist_layer_key
    return [(entry, list(dict.fromkeys((key(te_entry.name), key(entry.name, not mla))))) for entry, te_entry in zip(local, te)]


DIST_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                            "self_attention.linear_q_proj", "self_attention.linear_q_down_proj",
                            "self_attention.linear_q_up_proj", "self_attention.linear_kv_down_proj",
                            "self_attention.linear_kv_up_proj", "mlp.shared_experts.linear_fc1",
                            "mlp.shared_experts.linear_fc2", "eh_proj", "self_attention.in_proj",
                            "self_attention.out_proj")


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


def final_norm_keys(args):
    """The final norm's parameters: a LayerNorm's weight and bias, an RMSNorm's weight."""
    return ["weight", "bias"] if args.normalization == "LayerNorm" else ["weight"]
