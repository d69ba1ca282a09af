"""Hugging Face families as data: a Family names the architectures, the Megatron args the family
implies, and a table of per-layer tensors saying how each HF tensor becomes a message key (copied,
fused QKV, SwiGLU halves, optional extras such as q/k norms). The generic HF loader and saver
(hf_stream) run any Family; built-in and third-party families are written the same way.
"""

import dataclasses
import json
import math
import re

import torch

from converter_core import layout, megatron_args, protocol
from converter_core.errors import ConversionError, require
from converter_core.formats.untrusted import is_count

# How an entry of a layer table maps HF tensors to message keys.
COPY = "copy"                    # each HF tensor is one message tensor (names and keys pair up)
QKV = "qkv"                      # HF q, k, v -> Megatron's grouped qkv (weights or biases)
FUSED_QKV = "fused_qkv"          # one HF [q; k; v] tensor -> Megatron's grouped qkv
FUSED_GATE_UP = "fused_gate_up"  # one HF [gate; up] tensor -> the SwiGLU halves "mlp l0 weight W" / "V"
EXPERTS = "experts"              # one HF tensor per expert ("{}" in the name: the expert number) -> stacked
MLA_Q = "mla_q"                  # MLA query rows, per head [nope | rope]: rope rows reordered for rotate-half families
MLA_KV_DOWN = "mla_kv_down"      # MLA [kv latent | rope key] rows: the rope rows reordered likewise

# `when` values that depend on the layer, not the model: rows of MoE layers and of dense (MLP) layers.
MOE_LAYER, DENSE_LAYER = "moe layer", "dense layer"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One row of a family's layer table. `hf`: name(s) inside a layer ("self_attn.q_proj.weight");
    `key`: message key(s); `kind`: one of the kinds above; `when`: a Megatron args attribute that must
    be true for the tensor to exist (e.g. "add_qkv_bias", "qk_layernorm"; "not q_lora_rank": false),
    or MOE_LAYER / DENSE_LAYER."""
    hf: object
    key: object
    kind: str = COPY
    when: str = None

    @property
    def hf_names(self):
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    @property
    def keys(self):
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)


LLAMA_ATTENTION = (
    Tensor("input_layernorm.weight", "input norm weight"),
    Tensor(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv weight", QKV),
    Tensor("self_attn.o_proj.weight", "dense weight"),
    Tensor("post_attention_layernorm.weight", "post norm weight"),
)
LLAMA_MLP = (
    Tensor(("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp l0 weight W", "mlp l0 weight V")),
    Tensor("mlp.down_proj.weight", "mlp l1 weight"),
)
LLAMA_LAYER = LLAMA_ATTENTION + LLAMA_MLP
# Biases on q, k and v only (Qwen2); Megatron's add_qkv_bias.
QKV_BIAS = (Tensor(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv bias", QKV,
                   when="add_qkv_bias"),)
# Per-head RMSNorm of queries and keys (Qwen3, OLMo 2 style); Megatron's qk_layernorm.
QK_NORM = (
    Tensor("self_attn.q_norm.weight", "q norm weight", when="qk_layernorm"),
    Tensor("self_attn.k_norm.weight", "k norm weight", when="qk_layernorm"),
)


# Multi-latent attention (DeepSeek-V2/V3, MiniCPM3): low-rank query and key/value projections with
# latent norms, a rope key shared by the heads; without q_lora_rank the query is one projection.
MLA_ATTENTION = (
    Tensor("input_layernorm.weight", "input norm weight"),
    Tensor("self_attn.q_a_proj.weight", "q down weight", when="q_lora_rank"),
    Tensor("self_attn.q_a_layernorm.weight", "q latent norm weight", when="q_lora_rank"),
    Tensor("self_attn.q_b_proj.weight", "q up weight", MLA_Q, when="q_lora_rank"),
    Tensor("self_attn.q_proj.weight", "q weight", MLA_Q, when="not q_lora_rank"),
    Tensor("self_attn.kv_a_proj_with_mqa.weight", "kv down weight", MLA_KV_DOWN),
    Tensor("self_attn.kv_a_layernorm.weight", "kv latent norm weight"),
    Tensor("self_attn.kv_b_proj.weight", "kv up weight"),
    Tensor("self_attn.o_proj.weight", "dense weight"),
    Tensor("post_attention_layernorm.weight", "post norm weight"),
)


def on_dense_layers(rows):
    """`rows` present only on the dense layers of a model that also has MoE layers."""
    return tuple(dataclasses.replace(row, when=DENSE_LAYER) for row in rows)


def experts(router, gate, up, down):
    """The rows of a MoE layer whose experts are separate HF tensors: router, then each expert's gate,
    up and down projection (names with "{}" for the expert number)."""
    return (Tensor(router, "router weight", when=MOE_LAYER),
            Tensor((gate, up), ("mlp l0 weight W", "mlp l0 weight V"), EXPERTS, when=MOE_LAYER),
            Tensor(down, "mlp l1 weight", EXPERTS, when=MOE_LAYER))


def shared_experts(gate, up, down):
    """The rows of a MoE layer's shared experts (one SwiGLU MLP every token goes through)."""
    return (Tensor((gate, up), ("shared mlp l0 weight W", "shared mlp l0 weight V"), when=MOE_LAYER),
            Tensor(down, "shared mlp l1 weight", when=MOE_LAYER))


@dataclasses.dataclass(frozen=True)
class Experts:
    """How a family's config.json spells its mixture-of-experts settings. `count`: keys of the expert
    count, the first present wins; `ffn`: each expert's hidden size; `normalize`: True when the top-k
    weights are always renormalised, else the key of that bool (absent: false); `dense_layers` /
    `sparse_step`: keys of the dense-layer list and of "every Nth layer is MoE"; `first_dense`: key of
    "the first N layers are dense". DeepSeek-style routing: `score` "softmax" or "sigmoid"; `expert_bias`:
    the router has a score-correction bias; `groups`: keys of (group count, groups chosen per token);
    `scaling`: key of the routed-weight scale; `shared`: key of the shared-expert count (each expert_ffn wide);
    `optional`: the family has dense members too (MiniCPM and MiniCPM-MoE): experts only when the count is set."""
    count: tuple = ("num_local_experts",)
    ffn: str = "intermediate_size"
    normalize: object = True
    dense_layers: str = None
    sparse_step: str = None
    first_dense: str = None
    score: str = "softmax"
    expert_bias: bool = False
    groups: tuple = None
    scaling: str = None
    shared: str = None
    optional: bool = False

    def in_config(self, config):
        """Whether a config.json of the family describes experts."""
        return not self.optional or any(config.get(key) for key in self.count)


@dataclasses.dataclass(frozen=True)
class Family:
    """An HF model family. `args`: Megatron args the family always has (add_qkv_bias, qk_layernorm);
    `config`: config.json fields written when absent; `fields`: {config key: Megatron arg} carried both
    ways when present; `mup`: MiniCPM's scale_emb / scale_depth / dim_model_base; `tied_by_default`:
    what a config without tie_word_embeddings means; `experts`: an Experts for MoE families; `mla`:
    multi-latent attention (q_lora_rank, kv_lora_rank, qk_nope/rope_head_dim, v_head_dim in config.json);
    `rope_interleaved`: whether its rope pairs are interleaved as Megatron-Core's MLA expects (else the
    rows are reordered), or the config key saying so (absent: true). The top-level names default to Llama's."""
    model_type: str
    architectures: tuple
    layer: tuple = LLAMA_LAYER
    args: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    fields: dict = dataclasses.field(default_factory=dict)
    tied_by_default: bool = False
    mup: bool = False
    experts: Experts = None
    mla: bool = False
    rope_interleaved: object = True
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    output_layer: str = "lm_head.weight"
    layers: str = "model.layers.{}."

    @property
    def settings(self):
        """The Megatron args every model of the family has set (what a format must be able to hold)."""
        return dict(self.args, num_experts=self.experts is not None and not self.experts.optional,
                    multi_latent_attention=self.mla)

    @property
    def architecture(self):
        return self.architectures[0]

    def layer_prefix(self, index):
        return self.layers.format(index)

    def layer_index(self, name):
        """The layer number of an HF tensor name, or None for a tensor outside the layers."""
        before, _, after = self.layers.partition("{}")
        match = re.match(re.escape(before) + "([0-9]+)" + re.escape(after), name)
        return int(match.group(1)) if match else None

    def active(self, args, index=0):
        """The layer table rows present in layer `index` of a model with Megatron args `args`."""
        moe = megatron_args.moe_layers(args)[index]

        def present(when):
            if when in (MOE_LAYER, DENSE_LAYER):
                return moe == (when == MOE_LAYER)
            if when.startswith("not "):
                return not getattr(args, when[4:], False)
            return bool(getattr(args, when, False))
        return [t for t in self.layer if t.when is None or present(t.when)]


def by_model_type(*members):
    """{model_type: Family}: the form a plugin declares its FAMILIES in."""
    return {family.model_type: family for family in members}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Megatron hard-codes these for Llama-3 rope scaling (RotaryEmbedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

MUP_SCALARS = ("scale_emb", "scale_depth", "dim_model_base")


# config.json's sizes: each must be a positive integer (not 1e9, true or "4"); the optional ones may be
# absent or null.
COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def check_counts(config, where):
    """The sizes of a config.json are positive integers and divide as the model needs; checked before
    anything is computed or sized from them."""
    for name in COUNTS:
        require(name in config, f"{where}: missing field {name!r}")
    for name in COUNTS + OPTIONAL_COUNTS:
        value = config.get(name)
        require(is_count(value) or value is None and name in OPTIONAL_COUNTS,
                f"{where}: {name} must be a positive integer, got {value!r:.40}")
    heads, groups = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    require(heads % groups == 0, f"{where}: {heads} attention heads are not a multiple of {groups} KV heads")
    require(config.get("head_dim") or config["hidden_size"] % heads == 0,
            f"{where}: hidden_size {config['hidden_size']} is not a multiple of {heads} attention heads (and no head_dim)")


def family_of(config, where, families):
    """The family of a config.json: by model_type, else (MiniCPM hub configs have none) by architecture."""
    model_type = config.get("model_type")
    if model_type is None:
        by_architecture = {a: f for f in families.values() for a in f.architectures}
        model_type = next((by_architecture[a].model_type for a in config.get("architectures") or []
                           if a in by_architecture), None)
    require(model_type in families,
            f"{where}: model_type {model_type!r} is not one of {', '.join(sorted(families))}")
    return families[model_type]


def family_for_stream(args, families, where):
    """The family a saver writes: the one the stream came from (its stored config.json) when it is
    among `families`, else the first whose table holds exactly the stream's layer tensors and whose
    implied args the stream has, a muP family first for a muP stream (a phi3 stream written by a
    Llama saver becomes a Llama; a Megatron-made one with MiniCPM's scalars, a MiniCPM)."""
    stored = stored_config(args) or {}
    try:
        return family_of(stored, where, families)
    except ConversionError:
        pass
    fitting = [family for family in families.values()
               if all(getattr(args, name, None) == value for name, value in family.args.items())
               and not mismatch(family, args)]
    if fitting:
        return max(fitting, key=lambda family: family.mup == has_mup(args))  # max keeps the first of equals
    first = next(iter(families.values()))
    reason = mismatch(first, args) or ", ".join(f"{k}={v!r}" for k, v in first.args.items()) + " is not set"
    raise ConversionError(f"{where}: none of {', '.join(families)} can hold the stream ({first.model_type}: {reason})")


def mismatch(family, args):
    """Why `family` cannot hold a model with Megatron args `args` (message keys no row of its layer
    table fills, rows filling keys the model lacks, settings it has no config field for), or None."""
    parts = []
    if getattr(args, "rotary_percent", 1.0) != 1.0 and "rotary_percent" not in family.fields.values():
        parts.append(f"rotary_percent {args.rotary_percent} has no Hugging Face "
                     f"{family.architecture.removesuffix('ForCausalLM')} equivalent")
    kinds = megatron_args.moe_layers(args)
    for index in sorted({kinds.index(kind) for kind in kinds}):  # the first layer of each kind (dense, MoE)
        wanted = set(protocol.layer_message_shapes(args, index))
        filled = {key for row in family.active(args, index) for key in row.keys}
        layer = f"{'MoE' if kinds[index] else 'dense'} layers: " if any(kinds) else ""
        if wanted - filled:
            parts.append(f"{layer}the model's {', '.join(sorted(wanted - filled))} has no tensor in {family.model_type}")
        if filled - wanted:
            parts.append(f"{layer}{family.model_type}'s {', '.join(sorted(filled - wanted))} has no place in the model")
    if any(kinds) and family.experts is None:
        parts.append(f"{family.model_type} has no mixture-of-experts settings")
    elif any(kinds):
        parts += routing_problems(args, family.experts)
    return "; ".join(parts) or None


def routing_problems(args, experts):
    """Megatron router settings the family's HF router (`experts`: its Experts) does not have."""
    problems = []
    score = getattr(args, "moe_router_score_function", "softmax")
    if score != experts.score:
        problems.append(f"moe_router_score_function {score!r} ({experts.score} only)")
    supported = {"moe_router_enable_expert_bias": experts.expert_bias, "moe_router_num_groups": experts.groups,
                 "moe_router_topk_scaling_factor": experts.scaling, "moe_shared_expert_gate": False}
    for name, has in supported.items():
        if getattr(args, name, None) and not has:
            problems.append(f"{name} {getattr(args, name)!r} has no Hugging Face equivalent in this family")
    problems += [problem for problem in (group_problem(args), sigmoid_problem(args)) if problem]
    return problems


def group_problem(args):
    """Megatron-Core scores an expert group by its top topk/group_topk experts, DeepSeek's HF code by its
    top 2: they agree only when topk == 2 x group_topk (or grouping is off)."""
    groups, chosen, topk = getattr(args, "moe_router_num_groups", None), getattr(args, "moe_router_group_topk", None), \
        args.moe_router_topk
    if groups and chosen and topk != 2 * chosen:
        return (f"moe_router_group_topk {chosen} with moe_router_topk {topk}: Megatron-Core scores groups by their top "
                f"{topk // chosen} experts, Hugging Face by their top 2 (convertible only when topk = 2 x group_topk)")
    return None


def sigmoid_problem(args):
    """Megatron-Core always renormalises sigmoid top-k weights (top-k > 1); the HF config must too."""
    if getattr(args, "moe_router_score_function", "softmax") == "sigmoid" and args.moe_router_pre_softmax:
        return "moe_router_pre_softmax with sigmoid scores has no Hugging Face equivalent"
    return None


def moe_pattern(config, experts, layers):
    """Per layer, 1 for a MoE layer, as the family's config spells it (dense-layer list, every Nth layer
    MoE, the first N dense)."""
    dense = config.get(experts.dense_layers) or [] if experts.dense_layers else []
    step = config.get(experts.sparse_step) or 1 if experts.sparse_step else 1
    first = config.get(experts.first_dense) or 0 if experts.first_dense else 0
    return [int(i >= first and i not in dense and (i + 1) % step == 0) for i in range(layers)]


def moe_args(config, experts, where):
    """Megatron's MoE args from a config.json, as its Experts spells them."""
    count_key = next((key for key in experts.count if config.get(key) is not None), experts.count[0])
    count, topk, ffn = config.get(count_key), config.get("num_experts_per_tok"), config.get(experts.ffn)
    for name, value in ((count_key, count), ("num_experts_per_tok", topk), (experts.ffn, ffn)):
        require(is_count(value), f"{where}: {name} must be a positive integer, got {value!r:.40}")
    require(topk <= count, f"{where}: num_experts_per_tok {topk} exceeds the {count} experts")
    if experts.sparse_step and config.get(experts.sparse_step) is not None:
        require(is_count(config[experts.sparse_step]),
                f"{where}: {experts.sparse_step} must be a positive integer, got {config[experts.sparse_step]!r:.40}")
    dense = config.get(experts.dense_layers) if experts.dense_layers else None
    require(dense is None or isinstance(dense, list) and all(isinstance(i, int) for i in dense),
            f"{where}: {experts.dense_layers} must be a list of layer numbers")
    first = config.get(experts.first_dense) if experts.first_dense else None
    require(first is None or isinstance(first, int) and not isinstance(first, bool) and first >= 0,
            f"{where}: {experts.first_dense} must be a layer count, got {first!r:.40}")
    pattern = moe_pattern(config, experts, config["num_hidden_layers"])
    require(any(pattern), f"{where}: the config's dense-layer settings leave no MoE layer")
    normalize = experts.normalize is True or bool(config.get(experts.normalize, False))
    fields = dict(num_experts=count, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
                  moe_layer_freq=1 if all(pattern) else pattern, moe_router_score_function=experts.score,
                  moe_router_pre_softmax=not normalize and experts.score == "softmax", moe_grouped_gemm=False)
    if experts.score == "sigmoid":
        require(normalize or topk == 1, f"{where}: {experts.normalize}=false with sigmoid scores has no Megatron-Core "
                                        "equivalent (it always renormalises the top-k weights)")
        fields["moe_router_dtype"] = "fp32"  # the HF router runs in float32
    if experts.expert_bias:
        fields["moe_router_enable_expert_bias"] = True
    if experts.groups:
        groups, chosen = (config.get(key) for key in experts.groups)
        for key, value in zip(experts.groups, (groups, chosen)):
            require(is_count(value), f"{where}: {key} must be a positive integer, got {value!r:.40}")
        require(count % groups == 0, f"{where}: {experts.groups[0]} {groups} does not divide the {count} experts")
        if chosen < groups:  # else every group is chosen and grouping changes nothing
            require(topk == 2 * chosen, f"{where}: {experts.groups[1]} {chosen} with num_experts_per_tok {topk}: "
                                        "Megatron-Core scores groups by their top topk/group_topk experts, Hugging "
                                        "Face by their top 2; convertible only when num_experts_per_tok = 2 x "
                                        f"{experts.groups[1]}")
            fields.update(moe_router_num_groups=groups, moe_router_group_topk=chosen)
    if experts.scaling and config.get(experts.scaling) is not None:
        fields["moe_router_topk_scaling_factor"] = float(config[experts.scaling])
    if experts.shared and config.get(experts.shared):
        require(is_count(config[experts.shared]),
                f"{where}: {experts.shared} must be a positive integer, got {config[experts.shared]!r:.40}")
        fields["moe_shared_expert_intermediate_size"] = config[experts.shared] * ffn
    if config.get("router_aux_loss_coef") is not None:
        fields["moe_aux_loss_coeff"] = float(config["router_aux_loss_coef"])
    return fields


def moe_config(config, args, experts, where="config.json"):
    """Write the args' MoE settings into config.json in the family's spelling (in place)."""
    if not getattr(args, "num_experts", None):  # a dense model: every layer dense, if the family can say so
        if experts.optional:
            return
        require(experts.first_dense, f"{where}: a model without experts cannot be written as this MoE family")
        config[experts.first_dense] = args.num_layers
        return
    count_key = next((key for key in experts.count if key in config), experts.count[0])
    expert_ffn = megatron_args.expert_ffn_size(args)
    config.update({count_key: args.num_experts, "num_experts_per_tok": args.moe_router_topk, experts.ffn: expert_ffn})
    if experts.normalize is not True:
        config[experts.normalize] = not args.moe_router_pre_softmax
    if experts.groups:
        grouped = args.moe_router_num_groups and args.moe_router_group_topk
        if grouped or experts.groups[0] not in config:  # ungrouped: one group, chosen
            config.update(zip(experts.groups, (args.moe_router_num_groups, args.moe_router_group_topk) if grouped
                              else (1, 1)))
    if experts.scaling:
        config[experts.scaling] = float(args.moe_router_topk_scaling_factor or 1.0)
    if experts.shared:
        shared = args.moe_shared_expert_intermediate_size or 0
        require(shared % expert_ffn == 0, f"{where}: shared experts {shared} wide are not whole experts of {expert_ffn}")
        config[experts.shared] = shared // expert_ffn
    pattern = [int(moe) for moe in megatron_args.moe_layers(args)]
    if pattern == moe_pattern(config, experts, len(pattern)):
        return  # the stored spelling already says it
    first_moe = pattern.index(1) if any(pattern) else len(pattern)
    if experts.first_dense and all(pattern[first_moe:]):
        config[experts.first_dense] = first_moe
    elif experts.dense_layers:
        config[experts.dense_layers] = [i for i, moe in enumerate(pattern) if not moe]
        if experts.sparse_step:
            config[experts.sparse_step] = 1
    require(pattern == moe_pattern(config, experts, len(pattern)),
            f"{where}: the MoE layer pattern {pattern} cannot be written in this family's config")


def check_table(family, args, where):
    problem = mismatch(family, args)
    require(problem is None, f"{where}: {problem}")


ROPE_EXTRAS = ("partial_rotary_factor",)  # in transformers 5's rope_parameters beside the scaling


def config_value(config, key):
    """A config.json field, top-level or (transformers 5) inside rope_parameters."""
    parameters = config.get("rope_parameters")
    if key not in config and isinstance(parameters, dict):
        return parameters.get(key)
    return config.get(key)


def set_config_value(config, key, value):
    """Set a field where the config keeps it: top-level, inside rope_parameters (a rope extra of a
    transformers 5 config), or both (transformers 5 writes partial_rotary_factor twice)."""
    parameters = config.get("rope_parameters")
    inside = isinstance(parameters, dict) and (key in parameters or key in ROPE_EXTRAS and key not in config)
    if inside:
        config["rope_parameters"] = dict(parameters, **{key: value})
    if key in config or not inside:
        config[key] = value


def rope_settings(config):
    """(rope_theta, scaling dict or None) from either config style: transformers 5's rope_parameters
    or the older rope_theta + rope_scaling ("type" or "rope_type")."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta" and k not in ROPE_EXTRAS}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def rope_args(config, where, family):
    """Megatron's rotary arguments for a config; refuses settings Megatron cannot express.

    Llama-3 scaling maps to Megatron-Core's own; MiniCPM's LongRoPE to the arguments Megatron forks
    use for it (rope_scaling_type, long_factor, short_factor, ...); MiniCPM's dynamic NTK equals plain
    rope up to max_position_embeddings, so only the stored config.json keeps it."""
    theta, scaling = rope_settings(config)
    partial = config_value(config, "partial_rotary_factor")
    require(partial in (None, 1, 1.0) or "partial_rotary_factor" in family.fields,
            f"{where}: partial_rotary_factor {partial!r:.20} is not supported for {family.model_type} (it has no field "
            "for it)")
    fields = {"rotary_base": theta}
    kind = scaling and scaling.get("rope_type")
    if family.mla:
        fields["rope_type"] = "rope"  # Megatron's MLA default is yarn: always say which
    if kind is None or kind == "dynamic" and family.mup:
        return fields
    if kind == "yarn" and family.mla:
        return dict(fields, **yarn_args(scaling, config, where))
    if kind == "longrope" and family.mup:
        rotated = config.get("qk_rope_head_dim") if family.mla else config.get("head_dim")
        half = (rotated or config["hidden_size"] // config["num_attention_heads"]) // 2
        for name in ("long_factor", "short_factor"):
            require(len(scaling.get(name) or ()) == half, f"{where}: LongRoPE {name} needs {half} entries")
        fields.update(rope_scaling_type="longrope", long_factor=[float(f) for f in scaling["long_factor"]],
                      short_factor=[float(f) for f in scaling["short_factor"]],
                      rope_scaling_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        return fields
    require(kind == "llama3" and not family.mup, f"{where}: rope scaling {kind!r} has no Megatron-Core equivalent")
    for name, value in LLAMA3_FIXED.items():
        require(float(scaling.get(name, value)) == value,
                f"{where}: llama3 rope scaling with {name}={scaling.get(name)} cannot be expressed in "
                f"Megatron-Core (it fixes {name}={value})")
    fields.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return fields


# Megatron-LM's yarn args (MLA) and the HF rope_parameters key of each.
YARN_FIELDS = (("rotary_scaling_factor", "factor"), ("yarn_original_max_position_embeddings",
               "original_max_position_embeddings"), ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
               ("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim"))
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def yarn_args(scaling, config, where):
    """Megatron-Core's YaRN (MLA) from an HF yarn rope_scaling; refuses what it computes differently."""
    values = dict(YARN_DEFAULTS, **{k: v for k, v in scaling.items() if v is not None})
    values.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    require(isinstance(values.get("factor"), (int, float)) and values["factor"] > 0,
            f"{where}: yarn rope scaling needs a positive factor")
    require(values.get("attention_factor") is None and values.get("truncate", True),
            f"{where}: yarn attention_factor / truncate=false have no Megatron-Core equivalent")
    require(values["mscale"] == 1.0 or values["mscale_all_dim"],
            f"{where}: yarn mscale {values['mscale']} without mscale_all_dim differs between Megatron-Core and "
            "transformers")
    return {arg: (int if arg == "yarn_original_max_position_embeddings" else float)(values[key])
            for arg, key in YARN_FIELDS} | {"rope_type": "yarn"}


def mla_args(config, where):
    """Megatron's multi-latent attention args from an MLA config.json (DeepSeek's names)."""
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        require(is_count(config.get(name)), f"{where}: {name} must be a positive integer, got {config.get(name)!r:.40}")
    q_lora = config.get("q_lora_rank")
    require(q_lora is None or is_count(q_lora), f"{where}: q_lora_rank must be a positive integer or null")
    require(config["qk_rope_head_dim"] % 2 == 0, f"{where}: qk_rope_head_dim must be even")
    return dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=q_lora, kv_lora_rank=config["kv_lora_rank"],
                qk_head_dim=config["qk_nope_head_dim"], qk_pos_emb_head_dim=config["qk_rope_head_dim"],
                v_head_dim=config["v_head_dim"])


def args_from_config(config, where, dtype, untied, family, **fields):
    """Megatron args for an HF config of `family`. The whole config.json rides along as
    `hf_config_json`, so a later HF saver can write back every field Megatron has no name for."""
    check_counts(config, where)
    require(config.get("hidden_act", "silu") == "silu",
            f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    require(not config.get("mlp_bias"), f"{where}: mlp_bias=true has no Megatron-Core equivalent here")
    require(not config.get("attention_bias") or family.args.get("add_qkv_bias"),
            f"{where}: attention_bias=true (biases on q, k, v and o) has no Megatron-Core equivalent")
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    fields.update(rope_args(config, where, family))
    if family.mup:
        for name in MUP_SCALARS:
            value = config.get(name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool),
                    f"{where}: {name} is missing; MiniCPM's remote default (1) is silently wrong, so it must be given")
            require(math.isfinite(value) and value > 0, f"{where}: {name} must be a positive number, got {value!r}")
            fields[name] = value
    fields.update({arg: config_value(config, key) for key, arg in family.fields.items()
                   if config_value(config, key) is not None})
    if family.experts and family.experts.in_config(config):
        fields.update(moe_args(config, family.experts, where))
    if family.mla:
        fields.update(mla_args(config, where))
    fields.update(family.args)
    return megatron_args.make_args(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings") or 4096,
        where=where,
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        vocab_size=config["vocab_size"],
        params_dtype=dtype,
        untie_embeddings_and_output_weights=untied,
        hf_config_json=json.dumps(config, sort_keys=True),
        **fields)


def stored_config(args):
    text = getattr(args, "hf_config_json", None)
    return json.loads(text) if text else None


def has_mup(args):
    return any(getattr(args, name, None) is not None for name in MUP_SCALARS)


def mup_scalars(args):
    """(scale_emb, scale_depth, dim_model_base); a stream without them is the identity MiniCPM."""
    if has_mup(args):
        return tuple(getattr(args, name) for name in MUP_SCALARS)
    return 1, math.sqrt(args.num_layers), args.hidden_size


def longrope_static_choice(args):
    """(factors, cos/sin multiplier) MiniCPM's remote code uses up to max_position_embeddings: it builds
    its rope cache at that length, so long factors only when it exceeds the original length. A longer
    input rebuilds the cache at its own length (long factors past the original), same multiplier."""
    original, maximum = args.rope_scaling_original_max_position_embeddings, args.max_position_embeddings
    factors = args.long_factor if maximum > original else args.short_factor
    return list(factors), math.sqrt(1 + math.log(maximum / original) / math.log(original))


def config_from_args(args, vocab_size, family):
    """config.json for the model in `args` as `family`: the stored HF config when there is one, with
    every field Megatron knows taken from the args (they win: the checkpoint may have been changed since)."""
    stored = stored_config(args)
    if stored and stored.get("model_type", family.model_type) != family.model_type:
        stored = retargeted(stored, family)
    config = dict(stored) if stored else {}
    groups = megatron_args.query_groups(args)
    config.update(
        architectures=[family.architecture],
        hidden_size=args.hidden_size,
        intermediate_size=megatron_args.ffn_size(args),
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=groups,
        hidden_act="silu",
        rms_norm_eps=args.norm_epsilon,
        max_position_embeddings=args.max_position_embeddings,
        vocab_size=vocab_size,
    )
    tied = not megatron_args.untied(args)
    if not stored or "tie_word_embeddings" in stored or tied != family.tied_by_default:
        config["tie_word_embeddings"] = tied  # a stored config that relied on the default keeps doing so
    if not stored or "model_type" in stored:
        config["model_type"] = family.model_type  # MiniCPM hub configs have none; keep it that way
    head_dim = megatron_args.head_dim(args)
    if not family.mla and (config.get("head_dim") is not None or head_dim != args.hidden_size // args.num_attention_heads):
        config["head_dim"] = head_dim
    for name, value in family.config.items():
        config.setdefault(name, value)
    for key, arg in family.fields.items():
        if getattr(args, arg, None) is not None:
            set_config_value(config, key, getattr(args, arg))
    if family.mup:
        config.update(zip(MUP_SCALARS, mup_scalars(args)))  # always explicit: the remote defaults are wrong
    if family.experts:
        moe_config(config, args, family.experts)
    if family.mla:
        config.update(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_head_dim,
                      qk_rope_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim)
        if "head_dim" in config or "qk_head_dim" in config:  # transformers writes both, derived
            config.update(head_dim=args.qk_pos_emb_head_dim, qk_head_dim=args.qk_head_dim + args.qk_pos_emb_head_dim)
    _set_rope(config, args, family, stored is not None)
    dtype_key = "dtype" if "dtype" in config or "torch_dtype" not in config and stored else "torch_dtype"
    config[dtype_key] = DTYPE_NAMES[args.params_dtype]
    return config


# Fields of one family's config.json that mean nothing (or something else) in another's.
FAMILY_ONLY_FIELDS = ("model_type", "architectures", "auto_map", "_name_or_path")
MINICPM_ONLY_FIELDS = MUP_SCALARS + ("mup_denominator", "rope_scaling", "rope_parameters", "sparse_config")


def retargeted(config, family):
    """A stored config.json of another family as a starting point for `family`'s: the fields naming the
    family or its code go (the args supply the model's shape and rope)."""
    kept = {k: v for k, v in config.items() if k not in FAMILY_ONLY_FIELDS}
    return dict(kept, model_type=family.model_type)


def folded_args(args, family, where):
    """Args for writing a MiniCPM stream as `family` without muP (scalars folded into the weights).
    Settings it cannot reproduce are refused rather than written as a different model."""
    stored, name = stored_config(args) or {}, family.architecture.removesuffix("ForCausalLM")
    require(not stored.get("sparse_config"),
            f"{where}: sparse_config (InfLLM v2 sparse attention) has no {name} equivalent; use --saver minicpm_hf")
    _, scaling = rope_settings(stored)
    require(not scaling or scaling.get("rope_type") == "longrope",
            f"{where}: MiniCPM rope scaling {scaling and scaling.get('rope_type')!r} has no {name} equivalent; "
            "use --saver minicpm_hf")
    plain = {k: v for k, v in retargeted(stored, family).items() if k not in MINICPM_ONLY_FIELDS}
    plain.update(architectures=[family.architecture], tie_word_embeddings=False)
    folded = megatron_args.plain_copy(args)
    folded.hf_config_json = json.dumps(plain, sort_keys=True)
    folded.untie_embeddings_and_output_weights = True  # embeddings x scale_emb, head / width: never equal
    return folded


def _rope_from_args(args, family):
    """The rope scaling dict the args describe, in the target family's own semantics."""
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **LLAMA3_FIXED}
    if getattr(args, "multi_latent_attention", False) and getattr(args, "rope_type", None) in (None, "yarn"):
        values = {key: getattr(args, arg) for arg, key in YARN_FIELDS}  # unset rope_type: Megatron's MLA uses yarn
        if values["factor"] in (None, 1.0):
            return None  # yarn with factor 1 is plain rope
        if values["original_max_position_embeddings"] is None:
            values["original_max_position_embeddings"] = args.max_position_embeddings
        return {"rope_type": "yarn", **{k: v for k, v in values.items() if v is not None}}
    kind = getattr(args, "rope_scaling_type", None)
    if kind != "longrope":
        require(kind is None, f"rope scaling {kind!r} in the checkpoint args is not supported")
        return None
    original = args.rope_scaling_original_max_position_embeddings
    if family.mup:
        return {"rope_type": "longrope", "long_factor": list(args.long_factor),
                "short_factor": list(args.short_factor), "original_max_position_embeddings": original}
    # transformers' Llama takes long factors for inputs longer than the original length, else short, and
    # scales by attention_factor. MiniCPM does the same except that up to max_position_embeddings it uses
    # long ones whenever that exceeds the original length: short_factor is its choice there, long_factor
    # stays, and attention_factor is MiniCPM's (fixed by max_position_embeddings, never clamped).
    # (A MiniCPM model object keeps its grown cache after a long input; the Llama matches a fresh one.)
    factors, multiplier = longrope_static_choice(args)
    return {"rope_type": "longrope", "long_factor": list(args.long_factor), "short_factor": factors,
            "original_max_position_embeddings": original, "attention_factor": multiplier}


def _set_rope(config, args, family, stored):
    """Write the args' rotary settings in the config's own style, unless the config (`stored`: the one
    the stream came from) already says the same."""
    scaling = _rope_from_args(args, family)
    theta, current = rope_settings(config)
    if stored and theta == float(args.rotary_base) and _same_scaling(current, scaling):
        return  # a config made from args alone always states theta (family defaults differ: Mixtral's is 1e6)
    if isinstance(config.get("rope_parameters"), dict):
        extras = {k: v for k, v in config["rope_parameters"].items() if k in ROPE_EXTRAS}
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rotary_base), **extras,
                                     **(scaling or {})}
    else:
        config["rope_theta"] = float(args.rotary_base)
        config["rope_scaling"] = scaling


def _same_scaling(current, wanted):
    if wanted is None:  # dynamic NTK has no Megatron form; the stored config keeps it
        return current is None or current.get("rope_type") == "dynamic"
    if current is None or current.get("rope_type") != wanted["rope_type"]:
        return False
    return all(current.get(k) == v if isinstance(v, list) else float(current.get(k, YARN_DEFAULTS.get(k, -1))) == float(v)
               for k, v in wanted.items() if k != "rope_type")


def expected_shapes(args, vocab_rows, family):
    """{hf name: shape} of every tensor of the model, in file order."""
    shapes = {family.embedding: (vocab_rows, args.hidden_size)}
    for i in range(args.num_layers):
        shapes.update((family.layer_prefix(i) + name, shape) for name, shape in _layer_shapes(args, i, family))
    shapes[family.final_norm] = (args.hidden_size,)
    if megatron_args.untied(args):
        shapes[family.output_layer] = (vocab_rows, args.hidden_size)
    return shapes


def float32_names(args, family):
    """HF names of the tensors kept in float32 whatever the model's dtype (protocol.FLOAT32_KEYS)."""
    return {family.layer_prefix(i) + name for i in range(args.num_layers) for row in family.active(args, i)
            if set(row.keys) <= set(protocol.FLOAT32_KEYS) for name in row.hf_names}


def _layer_shapes(args, index, family):
    """(name inside the layer, shape) of layer `index`'s HF tensors."""
    heads, groups, head_dim, sizes = _qkv_sizes(args)
    message = protocol.layer_message_shapes(args, index)
    for row in family.active(args, index):
        first = message[row.keys[0]]
        if row.kind in (COPY, MLA_Q, MLA_KV_DOWN):
            yield from ((name, message[key]) for name, key in zip(row.hf_names, row.keys))
        elif row.kind == QKV:
            yield from ((name, (size, *first[1:])) for name, size in zip(row.hf_names, sizes))
        elif row.kind == FUSED_QKV:
            yield row.hf, first
        elif row.kind == FUSED_GATE_UP:
            yield row.hf, (2 * first[0], *first[1:])
        elif row.kind == EXPERTS:
            yield from ((name.format(e), message[key][1:]) for e in range(first[0])
                        for name, key in zip(row.hf_names, row.keys))


def _qkv_sizes(args):
    heads, groups, head_dim = args.num_attention_heads, megatron_args.query_groups(args), megatron_args.head_dim(args)
    return heads, groups, head_dim, [heads * head_dim, groups * head_dim, groups * head_dim]


def layer_to_message(tensors, index, args, family):
    """HF tensors of layer `index` (a dict by full HF name) -> the Megatron message."""
    heads, groups, head_dim, sizes = _qkv_sizes(args)
    prefix, message = family.layer_prefix(index), {}
    for row in family.active(args, index):
        if row.kind == EXPERTS:
            count = args.num_experts
            message.update((key, torch.stack([tensors[prefix + name.format(e)] for e in range(count)]))
                           for name, key in zip(row.hf_names, row.keys))
            continue
        hf = [tensors[prefix + name] for name in row.hf_names]
        if row.kind == COPY:
            message.update(zip(row.keys, hf))
        elif row.kind in (QKV, FUSED_QKV):
            q, k, v = hf if row.kind == QKV else torch.split(hf[0], sizes)
            message[row.key] = layout.hf_qkv_to_megatron(q, k, v, heads, groups, head_dim)
        elif row.kind == FUSED_GATE_UP:
            message.update(zip(row.keys, torch.chunk(hf[0], 2)))
        elif row.kind in (MLA_Q, MLA_KV_DOWN):
            message[row.key] = _mla_rope_rows(hf[0], row.kind, args, family, to_megatron=True)
    return message


def _mla_rope_rows(tensor, kind, args, family, to_megatron):
    """Megatron-Core's MLA reads each rope part as interleaved pairs (x0, x1), (x2, x3), ...; a family
    whose rope rotates halves (x_j with x_{j+d/2}) has its rope rows reordered so both compute the same."""
    interleaved = family.rope_interleaved
    if isinstance(interleaved, str):
        interleaved = (stored_config(args) or {}).get(interleaved, True)
    if interleaved:
        return tensor
    rope = args.qk_pos_emb_head_dim
    block = args.qk_head_dim + rope if kind == MLA_Q else args.kv_lora_rank + rope
    return layout.interleave_rope_rows(tensor, block, rope, inverse=not to_megatron)


def message_to_layer(message, index, args, family):
    """The inverse of layer_to_message; pops what it uses so the receiver can check for leftovers. A
    tensor split out of QKV comes as a tuple of row blocks (layout.megatron_qkv_to_hf), not yet copied."""
    heads, groups, head_dim, _ = _qkv_sizes(args)
    prefix, tensors = family.layer_prefix(index), {}
    for row in family.active(args, index):
        names = [prefix + name for name in row.hf_names]
        if row.kind == COPY:
            tensors.update(zip(names, (message.pop(key) for key in row.keys)))
        elif row.kind in (QKV, FUSED_QKV):
            q, k, v = layout.megatron_qkv_to_hf(message.pop(row.key), heads, groups, head_dim)
            tensors.update(zip(names, (q, k, v)) if row.kind == QKV else [(names[0], q + k + v)])
        elif row.kind == FUSED_GATE_UP:
            tensors[names[0]] = layout.concat_rows([message.pop(key) for key in row.keys])
        elif row.kind in (MLA_Q, MLA_KV_DOWN):
            tensors[names[0]] = _mla_rope_rows(layout.tensor_of(message.pop(row.key)), row.kind, args, family,
                                               to_megatron=False)
        elif row.kind == EXPERTS:
            for name, key in zip(names, row.keys):
                tensors.update((name.format(e), expert) for e, expert in enumerate(message.pop(key)))
    return tensors
