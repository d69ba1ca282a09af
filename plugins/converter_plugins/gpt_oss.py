"""gpt-oss (GptOssForCausalLM) as a family: Llama's attention with biases and one learnable sink logit per
head, sliding-window attention on the layers `layer_types` says, YaRN rope, and every layer a mixture of
experts with a biased router and biased experts stored stacked, gate and up interleaved, computing a
clamped quick-GELU GLU with an offset. Megatron-Core holds all of it: softmax_type "learnable"
(core_attention.softmax_offset), window_size / window_attn_skip_freq, position_embedding_type "yarn",
quick_geglu with glu_linear_offset and activation_func_clamp_value; expert biases exist only without
expert tensor parallelism, so the args keep expert_tensor_parallel_size 1."""

import dataclasses

import torch

from converter_core import plugin

_LEARNABLE = plugin.Condition("`softmax_type` learnable",
                              lambda args, index: getattr(args, "softmax_type", None) == "learnable")
_BIASED_EXPERTS = plugin.MOE_LAYERS & plugin.Condition("`add_bias_linear`", lambda args, index: args.add_bias_linear)

_FC1_BIAS = "mlp.experts.local_experts.{}.linear_fc1.bias"
KEYS = (
    plugin.LayerKey("attention sink", ("heads",), plugin.COLUMN, "self_attention.core_attention.softmax_offset",
                    _LEARNABLE, "per-head learnable softmax offset"),
    plugin.LayerKey("router bias", ("experts",), plugin.REPLICATED, "mlp.router.bias", _BIASED_EXPERTS,
                    "the router's bias"),
    plugin.LayerKey("experts l0 bias W", ("experts", "expert ffn"), plugin.SWIGLU, _FC1_BIAS, _BIASED_EXPERTS,
                    "every expert's gate bias, stacked", grouped="mlp.experts.linear_fc1.bias{}"),
    plugin.LayerKey("experts l0 bias V", ("experts", "expert ffn"), plugin.SWIGLU, _FC1_BIAS, _BIASED_EXPERTS,
                    "every expert's up bias, stacked", grouped="mlp.experts.linear_fc1.bias{}"),
    plugin.LayerKey("experts l1 bias", ("experts", "hidden"), plugin.REPLICATED,
                    "mlp.experts.local_experts.{}.linear_fc2.bias", _BIASED_EXPERTS,
                    "every expert's output bias, stacked", grouped="mlp.experts.linear_fc2.bias{}"),
)
for _key in KEYS:
    plugin.register_layer_key(_key)


class InterleavedGateUp(plugin.Kind):
    """gpt-oss's experts' [E, hidden, 2 x ffn] gate_up_proj (or its [E, 2 x ffn] bias), gate in the even
    columns and up in the odd ones -> Megatron's per-expert [ffn, hidden] gate (W) and up (V) halves."""

    def hf_shapes(self, row, shapes, args):
        experts, ffn, *rest = shapes[row.keys[0]]
        return [(row.hf, (experts, *rest, 2 * ffn))]

    def to_megatron(self, row, hf, args, family):
        stored = hf[row.hf]
        halves = (stored[..., 0::2], stored[..., 1::2])
        if stored.dim() == 3:
            halves = tuple(half.transpose(1, 2) for half in halves)
        return {key: half.contiguous() for key, half in zip(row.keys, halves)}

    def to_hf(self, row, message, args, family):
        gate, up = (plugin.tensor_of(message.pop(key)) for key in row.keys)
        if gate.dim() == 3:
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)
        return {row.hf: torch.stack((gate, up), dim=-1).flatten(-2)}


class TransposedExperts(plugin.Kind):
    """gpt-oss's experts' [E, ffn, hidden] down_proj -> Megatron's per-expert [hidden, ffn] fc2."""

    def hf_shapes(self, row, shapes, args):
        experts, rows, columns = shapes[row.key]
        return [(row.hf, (experts, columns, rows))]

    def to_megatron(self, row, hf, args, family):
        return {row.key: hf[row.hf].transpose(1, 2).contiguous()}

    def to_hf(self, row, message, args, family):
        return {row.hf: plugin.tensor_of(message.pop(row.key)).transpose(1, 2).contiguous()}


INTERLEAVED_GATE_UP, TRANSPOSED_EXPERTS = InterleavedGateUp(), TransposedExperts()
LAYER = plugin.LLAMA_ATTENTION + (
    plugin.Tensor(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv bias", plugin.QKV),
    plugin.Tensor("self_attn.o_proj.bias", "dense bias"),
    plugin.Tensor("self_attn.sinks", "attention sink"),
    plugin.Tensor("mlp.router.weight", "router weight"),
    plugin.Tensor("mlp.router.bias", "router bias"),
    plugin.Tensor("mlp.experts.gate_up_proj", ("mlp l0 weight W", "mlp l0 weight V"), INTERLEAVED_GATE_UP),
    plugin.Tensor("mlp.experts.gate_up_proj_bias", ("experts l0 bias W", "experts l0 bias V"), INTERLEAVED_GATE_UP),
    plugin.Tensor("mlp.experts.down_proj", "mlp l1 weight", TRANSPOSED_EXPERTS),
    plugin.Tensor("mlp.experts.down_proj_bias", "experts l1 bias"),
)

QUICK_GELU_ALPHA = 1.702  # Megatron-Core's quick_gelu: x * sigmoid(1.702 x)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class GptOssParts(plugin.Feature):
    """The settings gpt-oss spells its own way: the clamped quick-GELU GLU with offset 1 (swiglu_alpha,
    swiglu_limit), attention sinks, biases everywhere, and the sliding-window layers."""

    def to_args(self, config, where, family):
        alpha, limit = config.get("swiglu_alpha", QUICK_GELU_ALPHA), config.get("swiglu_limit", 7.0)
        plugin.require(alpha == QUICK_GELU_ALPHA, f"{where}: swiglu_alpha {alpha!r:.20} has no Megatron-Core "
                                                  f"equivalent (its quick-GELU gate fixes {QUICK_GELU_ALPHA})")
        plugin.require(type(limit) in (int, float) and limit > 0, f"{where}: swiglu_limit must be a positive number")
        plugin.require(config.get("attention_bias", True), f"{where}: attention_bias false has no Megatron-Core "
                                                           "equivalent in gpt-oss (its experts keep their biases)")
        args = dict(swiglu=False, quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=float(limit),
                    bias_swiglu_fusion=False, bias_gelu_fusion=False, add_bias_linear=True, add_qkv_bias=True,
                    softmax_type="learnable", expert_tensor_parallel_size=1)
        layers = config["num_hidden_layers"]
        types = config.get("layer_types")
        if types is None:
            types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        plugin.require(isinstance(types, list) and len(types) == layers and set(types) <= {SLIDING, FULL},
                       f"{where}: layer_types must list {SLIDING!r} or {FULL!r} for each of the {layers} layers")
        window = config.get("sliding_window")
        if SLIDING in types:
            plugin.require(isinstance(window, int) and not isinstance(window, bool) and window > 0,
                           f"{where}: sliding_window must be a positive integer, got {window!r:.40}")
            pattern = [int(kind == SLIDING) for kind in types]
            alternate = pattern == [int(i % 2 == 0) for i in range(layers)]
            # Megatron-Core attends to window_size[0] tokens before each one (Hugging Face: window - 1)
            args.update(window_size=(window - 1, 0), window_attn_skip_freq=2 if alternate else pattern)
        return args

    def to_config(self, config, args, family):
        config["swiglu_limit"] = args.activation_func_clamp_value
        config.setdefault("swiglu_alpha", QUICK_GELU_ALPHA)
        config["attention_bias"] = True
        window, skip = getattr(args, "window_size", None), getattr(args, "window_attn_skip_freq", None)
        if window:
            config["sliding_window"] = window[0] + 1
            layers = range(args.num_layers)
            sliding = [bool(skip[i]) for i in layers] if isinstance(skip, list) else \
                [skip is None or (i + 1) % skip != 0 for i in layers]
            config["layer_types"] = [SLIDING if on else FULL for on in sliding]
        else:
            config["layer_types"] = [FULL] * args.num_layers

    def problems(self, args, family):
        wanted = dict(quick_geglu=True, glu_linear_offset=1.0, softmax_type="learnable", add_bias_linear=True)
        problems = [f"{name} {getattr(args, name, None)!r} (gpt-oss has {value!r})" for name, value in wanted.items()
                    if getattr(args, name, None) != value]
        window = getattr(args, "window_size", None)
        if window and tuple(window)[1] != 0:
            problems.append(f"window_size {window!r} looks ahead (gpt-oss's windows are causal)")
        if not getattr(args, "activation_func_clamp_value", None):
            problems.append("no activation_func_clamp_value (gpt-oss clamps at swiglu_limit)")
        return problems

    def settings(self):
        return {"quick_geglu": True, "softmax_type": "learnable"}


class _Unused(plugin.Feature):
    """gpt-oss's config names hidden_act "silu", which its code never reads; kept as stored."""


GPT_OSS = plugin.Family(
    "gpt_oss", ("GptOssForCausalLM",), layer=LAYER, features=(GptOssParts(),), activation=_Unused(),
    norm=plugin.Norm("RMSNorm", ("rms_norm_eps",), 1e-5),
    experts=plugin.Experts(count=("num_local_experts", "num_experts")),
    config={"hidden_act": "silu"},
    notes=("attention sinks (softmax_type learnable), q/k/v/o, router and expert biases (experts whole on every TP "
           "rank: expert_tensor_parallel_size 1), sliding windows from layer_types (window_size, "
           "window_attn_skip_freq), YaRN rope (position_embedding_type yarn), the clamped quick-GELU GLU with offset "
           "1 (quick_geglu, glu_linear_offset, activation_func_clamp_value)",
           "MXFP4 weights as released (*_blocks, *_scales) are dequantized to bf16 on the way in; the way back "
           "writes bf16 without quantization_config"))
