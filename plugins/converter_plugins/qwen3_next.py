"""Qwen3-Next (Qwen3NextForCausalLM) as a family: hybrid layers, Gated DeltaNet linear attention on most and
gated softmax attention (a sigmoid output gate per query row, per-head q/k norms, rotary on part of each head)
every full_attention_interval-th; every layer's MLP a softmax top-k mixture of experts plus one shared expert
scaled by a sigmoid gate; zero-centred norms (x * (1 + w)). Megatron-Core holds all of it:
experimental_attention_variant "gated_delta_net" with linear_attention_freq and the linear_* sizes,
attention_output_gate, qk_layernorm, rotary_percent, moe_shared_expert_gate and layernorm_zero_centered_gamma.

The DeltaNet tensors: Hugging Face stores the input projection as two tensors grouped per key head
(in_proj_qkvz: per group q, k, v, z; in_proj_ba: per group beta, alpha), Megatron-Core as one in_proj whose
rows are [q; k; v; z; beta; alpha], each part split over TP on its own (rank r: [q_r; k_r; v_r; z_r; beta_r;
alpha_r]), and its conv1d [q; k; v] channels the same way; in torch_dist each part is its own tensor
(in_proj.weight.query, ..., conv1d.weight.value), as megatron-core's sharded_state_dict declares them. The gated output norm is a plain RMSNorm in
Hugging Face (weight w) but zero-centred in Megatron-Core like every other norm there (stored w - 1)."""

import dataclasses

import torch

from converter_core import plugin

LINEAR, SOFTMAX = plugin.LINEAR_ATTENTION, ~plugin.LINEAR_ATTENTION
_GATED = SOFTMAX & plugin.Condition("`attention_output_gate`",
                                    lambda args, index: getattr(args, "attention_output_gate", False))
_SHARED_GATE = plugin.MOE_LAYERS & plugin.Condition("`moe_shared_expert_gate`",
                                                    lambda args, index: getattr(args, "moe_shared_expert_gate", False))


def _key_rows(args):
    return args.linear_num_key_heads * args.linear_key_head_dim


def _value_rows(args):
    return args.linear_num_value_heads * args.linear_value_head_dim


for _name, _size, _meaning in (
        ("linear key heads x key head dim", _key_rows, "`linear_num_key_heads` x `linear_key_head_dim`"),
        ("linear value heads x value head dim", _value_rows, "`linear_num_value_heads` x `linear_value_head_dim`"),
        ("linear value heads", lambda args: args.linear_num_value_heads, "`linear_num_value_heads`"),
        ("linear value head dim", lambda args: args.linear_value_head_dim, "`linear_value_head_dim`"),
        ("linear conv kernel", lambda args: args.linear_conv_kernel_dim, "`linear_conv_kernel_dim`"),
        ("(2 heads + 2 groups) x head_dim",
         lambda args: (2 * args.num_attention_heads + 2 * args.num_query_groups) * args.kv_channels,
         "query, gate, key and value rows of gated attention")):
    plugin.register_dimension(_name, _size, _meaning)

_IN_PROJ, _CONV = "self_attention.in_proj.weight", "self_attention.conv1d.weight"
_QK, _V, _HEADS = "linear key heads x key head dim", "linear value heads x value head dim", "linear value heads"
IN_PROJ_KEYS = ("linear q weight", "linear k weight", "linear v weight", "linear z weight", "linear beta weight",
                "linear alpha weight")
CONV_KEYS = ("linear conv q weight", "linear conv k weight", "linear conv v weight")
# megatron-core's GatedDeltaNet.sharded_state_dict: torch_dist holds in_proj.weight.<part> and conv1d.weight.<part>
IN_PROJ_PARTS = ("query", "key", "value", "z", "beta", "alpha")
KEYS = (
    plugin.LayerKey("linear input norm weight", ("hidden",), plugin.REPLICATED, "input_layernorm.weight", LINEAR,
                    "norm before linear attention", te="self_attention.in_proj.layer_norm_weight"),
    *(plugin.LayerKey(key, (rows, "hidden"), plugin.SWIGLU, _IN_PROJ, LINEAR, f"DeltaNet input projection: {what}",
                      dist_part=part)
      for key, rows, part, what in zip(IN_PROJ_KEYS, (_QK, _QK, _V, _V, _HEADS, _HEADS), IN_PROJ_PARTS,
                                       ("queries", "keys", "values", "output gate (z)", "beta (write strength)",
                                        "alpha (decay, before dt_bias)"))),
    *(plugin.LayerKey(key, (rows, 1, "linear conv kernel"), plugin.SWIGLU, _CONV, LINEAR,
                      f"depthwise causal convolution of the {part} channels", dist_part=part)
      for key, rows, part in zip(CONV_KEYS, (_QK, _QK, _V), IN_PROJ_PARTS)),
    plugin.LayerKey("linear A_log", (_HEADS,), plugin.COLUMN, "self_attention.A_log", LINEAR,
                    "log of each value head's decay rate"),
    plugin.LayerKey("linear dt_bias", (_HEADS,), plugin.COLUMN, "self_attention.dt_bias", LINEAR,
                    "each value head's time-step bias"),
    plugin.LayerKey("linear out norm weight", ("linear value head dim",), plugin.REPLICATED,
                    "self_attention.out_norm.weight", LINEAR,
                    "gated output norm (per value head; zero-centred with layernorm_zero_centered_gamma)"),
    plugin.LayerKey("linear out weight", ("hidden", _V), plugin.ROW, "self_attention.out_proj.weight", LINEAR,
                    "DeltaNet output projection"),
    plugin.LayerKey("gated qkv weight", ("(2 heads + 2 groups) x head_dim", "hidden"), plugin.COLUMN,
                    "self_attention.linear_qkv.weight", _GATED,
                    "attention_output_gate: per KV group its query heads, their output gates, one key head, one "
                    "value head"),
    plugin.LayerKey("shared expert gate weight", (1, "hidden"), plugin.REPLICATED, "mlp.shared_experts.gate_weight",
                    _SHARED_GATE, "the sigmoid gate scaling the shared experts' output"),
)
for _key in KEYS:
    plugin.register_layer_key(_key)


class GatedQkv(plugin.Kind):
    """q_proj (per head [query; gate] rows), k_proj, v_proj -> Megatron's gated linear_qkv: per KV group its
    query heads, their gates, then one key and one value head."""

    def hf_shapes(self, row, shapes, args):
        head_dim, groups, heads = args.kv_channels, args.num_query_groups, args.num_attention_heads
        return [(name, (rows * head_dim, args.hidden_size))
                for name, rows in zip(row.hf_names, (2 * heads, groups, groups))]

    def to_megatron(self, row, hf, args, family):
        q, k, v = (hf[name] for name in row.hf_names)
        groups, head_dim = args.num_query_groups, args.kv_channels
        per_group = args.num_attention_heads // groups
        q = q.reshape(groups, per_group, 2, head_dim, -1)
        parts = (q[:, :, 0].flatten(1, 2), q[:, :, 1].flatten(1, 2), k.reshape(groups, head_dim, -1),
                 v.reshape(groups, head_dim, -1))
        return {row.key: torch.cat(parts, dim=1).flatten(0, 1)}

    def to_hf(self, row, message, args, family):
        groups, head_dim = args.num_query_groups, args.kv_channels
        per_group = args.num_attention_heads // groups
        rows = plugin.tensor_of(message.pop(row.key)).reshape(groups, 2 * per_group + 2, head_dim, -1)
        q = torch.stack((rows[:, :per_group], rows[:, per_group:2 * per_group]), dim=2).flatten(0, 3)
        k, v = rows[:, 2 * per_group].flatten(0, 1), rows[:, 2 * per_group + 1].flatten(0, 1)
        return dict(zip(row.hf_names, (q, k.contiguous(), v.contiguous())))


def _group_split(args):
    """Per key-head group, the rows of in_proj_qkvz (q, k, v, z) and of in_proj_ba (beta, alpha)."""
    ratio = args.linear_num_value_heads // args.linear_num_key_heads
    return ((args.linear_key_head_dim,) * 2 + (ratio * args.linear_value_head_dim,) * 2, (ratio, ratio))


class DeltaNetInProj(plugin.Kind):
    """in_proj_qkvz and in_proj_ba, grouped per key head -> the six parts of Megatron-Core's in_proj."""

    def hf_shapes(self, row, shapes, args):
        groups = args.linear_num_key_heads
        return [(name, (groups * sum(split), args.hidden_size)) for name, split in zip(row.hf_names, _group_split(args))]

    def to_megatron(self, row, hf, args, family):
        groups, parts = args.linear_num_key_heads, []
        for name, split in zip(row.hf_names, _group_split(args)):
            grouped = hf[name].reshape(groups, sum(split), -1)
            parts += [part.flatten(0, 1) for part in torch.split(grouped, split, dim=1)]
        return dict(zip(row.keys, parts))

    def to_hf(self, row, message, args, family):
        groups, tensors, keys = args.linear_num_key_heads, {}, iter(row.keys)
        for name, split in zip(row.hf_names, _group_split(args)):
            parts = [plugin.tensor_of(message.pop(next(keys))).reshape(groups, size, -1) for size in split]
            tensors[name] = torch.cat(parts, dim=1).flatten(0, 1)
        return tensors


class Channels(plugin.Kind):
    """One HF tensor whose rows are the row keys' tensors one after another (the conv1d's q, k, v channels)."""

    def hf_shapes(self, row, shapes, args):
        first = shapes[row.keys[0]]
        return [(row.hf, (sum(shapes[key][0] for key in row.keys), *first[1:]))]

    def to_megatron(self, row, hf, args, family):
        sizes = (_key_rows(args), _key_rows(args), _value_rows(args))
        return dict(zip(row.keys, torch.split(hf[row.hf], sizes)))

    def to_hf(self, row, message, args, family):
        return {row.hf: torch.cat([plugin.tensor_of(message.pop(key)) for key in row.keys])}


class ZeroCentred(plugin.Kind):
    """A plain norm weight w in Hugging Face, stored zero-centred (w - 1) in Megatron. Exact both ways for
    weights in [0.5, 2] (w - 1 is then representable, Sterbenz); outside, w - 1 rounds to the model's dtype
    as Megatron-Core's own zero-centred weight would."""

    def to_megatron(self, row, hf, args, family):
        return {row.key: hf[row.hf] - 1}

    def to_hf(self, row, message, args, family):
        return {row.hf: plugin.tensor_of(message.pop(row.key)) + 1}


_ATTENTION = "self_attn."
_DELTANET = "linear_attn."
LAYER = (
    plugin.Tensor("input_layernorm.weight", "input norm weight", when=SOFTMAX),
    plugin.Tensor("input_layernorm.weight", "linear input norm weight", when=LINEAR),
    plugin.Tensor(tuple(_ATTENTION + name for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
                  "gated qkv weight", GatedQkv(), when=SOFTMAX),
    plugin.Tensor(_ATTENTION + "q_norm.weight", "q norm weight", when=SOFTMAX),
    plugin.Tensor(_ATTENTION + "k_norm.weight", "k norm weight", when=SOFTMAX),
    plugin.Tensor(_ATTENTION + "o_proj.weight", "dense weight", when=SOFTMAX),
    plugin.Tensor((_DELTANET + "in_proj_qkvz.weight", _DELTANET + "in_proj_ba.weight"), IN_PROJ_KEYS, DeltaNetInProj(),
                  when=LINEAR),
    plugin.Tensor(_DELTANET + "conv1d.weight", CONV_KEYS, Channels(), when=LINEAR),
    plugin.Tensor(_DELTANET + "A_log", "linear A_log", when=LINEAR),
    plugin.Tensor(_DELTANET + "dt_bias", "linear dt_bias", when=LINEAR),
    plugin.Tensor(_DELTANET + "norm.weight", "linear out norm weight", ZeroCentred(), when=LINEAR),
    plugin.Tensor(_DELTANET + "out_proj.weight", "linear out weight", when=LINEAR),
    plugin.Tensor("post_attention_layernorm.weight", "post norm weight"),
) + plugin.on_dense_layers(plugin.LLAMA_MLP) + plugin.experts(
    "mlp.gate.weight", "mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight",
    "mlp.experts.{}.down_proj.weight") + plugin.shared_experts(
    "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight") + (
    plugin.Tensor("mlp.shared_expert_gate.weight", "shared expert gate weight", when=plugin.MOE_LAYER),)

LINEAR_TYPE, FULL_TYPE = "linear_attention", "full_attention"
# config.json's DeltaNet sizes (transformers' defaults), the same names as Megatron-LM's args
LINEAR_SIZES = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32}
DEFAULT_INTERVAL, DEFAULT_PARTIAL_ROTARY = 4, 0.25  # transformers' defaults when config.json has neither


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _layer_types(interval, layers):
    """transformers' layer_types for full_attention_interval (and Megatron's for linear_attention_freq)."""
    return [LINEAR_TYPE if (i + 1) % interval else FULL_TYPE for i in range(layers)]


@dataclasses.dataclass(frozen=True)
class Qwen3NextParts(plugin.Feature):
    """The settings Qwen3-Next spells its own way: which layers are linear attention (layer_types, or
    full_attention_interval as released), the DeltaNet sizes, the partial rotary default and the shared
    expert with its gate."""

    def to_args(self, config, where, family):
        layers = config["num_hidden_layers"]
        interval, types = config.get("full_attention_interval"), config.get("layer_types")
        plugin.require(interval is None or _count(interval),
                       f"{where}: full_attention_interval must be a positive integer, got {interval!r:.40}")
        regular = _layer_types(interval or DEFAULT_INTERVAL, layers)
        plugin.require(types is None or isinstance(types, list) and len(types) == layers
                       and set(types) <= {LINEAR_TYPE, FULL_TYPE},
                       f"{where}: layer_types must list {LINEAR_TYPE!r} or {FULL_TYPE!r} for each of the {layers} "
                       f"layers, got {types!r:.80}")
        plugin.require(types is None or interval is None or types == regular,
                       f"{where}: layer_types does not have full attention every full_attention_interval "
                       f"({interval}) layers")
        types = types or regular
        period = types.index(FULL_TYPE) + 1 if FULL_TYPE in types else None  # Megatron's int form when regular
        args = dict(linear_attention_freq=period if period and types == _layer_types(period, layers)
                    else [int(kind == LINEAR_TYPE) for kind in types])
        for key, default in LINEAR_SIZES.items():
            value = config.get(key, default)
            plugin.require(_count(value), f"{where}: {key} must be a positive integer, got {value!r:.40}")
            args[key] = value
        plugin.require(args["linear_num_value_heads"] % args["linear_num_key_heads"] == 0,
                       f"{where}: linear_num_value_heads {args['linear_num_value_heads']} is not a multiple of "
                       f"linear_num_key_heads {args['linear_num_key_heads']}")
        if plugin.rope_config_value(config, "partial_rotary_factor") is None:
            args["rotary_percent"] = DEFAULT_PARTIAL_ROTARY
        shared = config.get("shared_expert_intermediate_size")
        plugin.require(_count(shared), f"{where}: shared_expert_intermediate_size must be a positive integer, got "
                                       f"{shared!r:.40}")
        args.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
        return args

    def to_config(self, config, args, family):
        types = [LINEAR_TYPE if linear else FULL_TYPE for linear in plugin.linear_attention_layers(args)]
        interval = config.get("full_attention_interval")
        if interval is not None and (not _count(interval) or _layer_types(interval, args.num_layers) != types):
            del config["full_attention_interval"]  # the stored interval no longer says it: layer_types does
            interval = None
        if "layer_types" in config or interval is None:
            config["layer_types"] = types
        config.update({key: getattr(args, key) for key in LINEAR_SIZES})
        config["head_dim"] = args.kv_channels  # transformers' default (256) is not hidden / heads
        config["shared_expert_intermediate_size"] = args.moe_shared_expert_intermediate_size

    def problems(self, args, family):
        wanted = dict(experimental_attention_variant="gated_delta_net", attention_output_gate=True,
                      moe_shared_expert_gate=True)
        return [f"{name} {getattr(args, name, None)!r} (Qwen3-Next has {value!r})" for name, value in wanted.items()
                if getattr(args, name, None) != value]

    def settings(self):
        return {"experimental_attention_variant": "gated_delta_net", "attention_output_gate": True}


class SharedGateExperts(plugin.Experts):
    """Qwen3-Next's router settings; its shared expert's sigmoid gate (moe_shared_expert_gate) is held by
    Qwen3NextParts and the "shared expert gate weight" key."""

    def problems(self, args, family):
        return [problem for problem in super().problems(args, family)
                if not problem.startswith("moe_shared_expert_gate")]


QWEN3_NEXT = plugin.Family(
    "qwen3_next", ("Qwen3NextForCausalLM",), layer=LAYER, features=(Qwen3NextParts(),) + plugin.LLAMA_BIAS_SWITCHES,
    args={"qk_layernorm": True, "attention_output_gate": True, "experimental_attention_variant": "gated_delta_net"},
    norm=plugin.Norm("RMSNorm", ("rms_norm_eps",), 1e-6, zero_centred=True),
    experts=SharedGateExperts(count=("num_experts",), ffn="moe_intermediate_size", normalize="norm_topk_prob",
                              dense_layers="mlp_only_layers", sparse_step="decoder_sparse_step"),
    fields={"partial_rotary_factor": "rotary_percent"}, config={"attention_bias": False},
    notes=("Gated DeltaNet linear attention (experimental_attention_variant gated_delta_net, linear_attention_freq "
           "from layer_types or full_attention_interval, linear_* sizes) and gated softmax attention "
           "(attention_output_gate) with q/k norms and partial rotary (rotary_percent); zero-centred norms "
           "(layernorm_zero_centered_gamma; the DeltaNet's gated output norm, plain in Hugging Face, is stored minus "
           "one); softmax top-k experts with a sigmoid-gated shared expert (moe_shared_expert_gate)",
           "in torch_dist the DeltaNet's in_proj and conv1d are one tensor per part (in_proj.weight.query, ...), as "
           "megatron-core stores them; legacy Megatron formats refuse it"))
