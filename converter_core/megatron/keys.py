"""The keys of a "transformer layer N" message, in one table. Each row says what a key holds, its shape
(named dimensions sized from the Megatron args), how Megatron splits it over tensor-parallel ranks, its
dtype, the parameter that holds it in Megatron-Core (local and TransformerEngine specs) and in legacy
Megatron-LM, and which layers have it. The protocol's shapes and checks, the Megatron schema and
docs/message-keys.md all derive from it.

A plugin adds keys with register_layer_key, at import time of its loader or saver plugin module (or of
a module they import). The orchestrator imports both plugin modules in each side's process before that
side runs, so a key either registers is known to both sides, built-in plugins included, under fork or
spawn.
"""

import dataclasses

import torch

from converter_core import layout
from converter_core.errors import require
from converter_core.megatron import args as megatron_args

# Parameter names to give: Megatron-Core's local spec, its TransformerEngine spec, legacy Megatron-LM.
LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
LEGACY = "legacy"

# How Megatron divides a tensor over tensor-parallel ranks (layout's rules, named here for plugins).
COLUMN, ROW, REPLICATED, SWIGLU = layout.COLUMN, layout.ROW, layout.REPLICATED, layout.SWIGLU
SPLITS = (COLUMN, ROW, REPLICATED, SWIGLU)


class Condition:
    """When a layer has a key: a test of (Megatron args, layer index), with the words the key reference
    shows for it. Conditions combine with `&` and `~`."""

    def __init__(self, text, test, negated=None):
        self.text, self.test = text, test
        self.negated = negated or f"not {text}"

    def __call__(self, args, index):
        return bool(self.test(args, index))

    def __and__(self, other):
        return Condition(f"{self.text} and {other.text}", lambda args, index: self(args, index) and other(args, index))

    def __invert__(self):
        return Condition(self.negated, lambda args, index: not self(args, index), self.text)


def flag(name):
    """The Megatron arg `name` is set (true, or a non-zero size)."""
    return Condition(f"`{name}`", lambda args, index: getattr(args, name, None))


def _is_moe_layer(args, index):
    return megatron_args.is_moe_layer(args, index)


ALWAYS = Condition("always", lambda args, index: True)
LAYER_NORM = Condition("LayerNorm", lambda args, index: args.normalization == "LayerNorm", "RMSNorm")
MLA = Condition("multi-latent attention", lambda args, index: getattr(args, "multi_latent_attention", False),
                "no multi-latent attention")
# The layer is a mixture-of-experts layer (moe_layer_freq); a plugin's keys of MoE layers use it (plugin.MOE_LAYERS).
MOE = Condition("MoE layers", _is_moe_layer, "dense layers")
DENSE = ~MOE
# Layer num_layers + i is multi-token-prediction layer i: a transformer layer built like the last decoder
# layer, with the parts around it (MTP keys).
MTP = Condition("multi-token-prediction layers", lambda args, index: index >= args.num_layers, "decoder layers")
QKV_BIAS = Condition("a QKV bias (`add_qkv_bias` or `add_bias_linear`)",
                     lambda args, index: args.add_qkv_bias or args.add_bias_linear)
# Linear attention (experimental_attention_variant, linear_attention_freq): those layers have no softmax
# attention's keys; a plugin registers theirs (plugin.LINEAR_ATTENTION). attention_output_gate changes the
# softmax attention's qkv rows; a plugin registers those too.
LINEAR_ATTENTION = Condition("linear-attention layers", megatron_args.is_linear_attention_layer,
                             "softmax-attention layers")
SOFTMAX = ~LINEAR_ATTENTION
_UNGATED = ~flag("attention_output_gate")


def _query_key_value_rows(args):
    return (args.num_attention_heads + 2 * megatron_args.query_groups(args)) * megatron_args.head_dim(args)


# The dimensions a key's shape is written in: {name: (size from the Megatron args, where it comes from)}.
DIMENSIONS = {
    "hidden": (lambda args: args.hidden_size, "`hidden_size`"),
    "2 x hidden": (lambda args: 2 * args.hidden_size, "twice `hidden_size`"),
    "heads": (lambda args: args.num_attention_heads, "`num_attention_heads`"),
    "head_dim": (megatron_args.head_dim, "`kv_channels`, else hidden / heads"),
    "(heads + 2 groups) x head_dim": (_query_key_value_rows, "groups: `num_query_groups` with "
                                                             "`group_query_attention`, else heads"),
    "heads x head_dim": (lambda args: args.num_attention_heads * megatron_args.head_dim(args), "heads times head_dim"),
    "ffn": (megatron_args.ffn_size, "`ffn_hidden_size`, else 4 x hidden"),
    "experts": (lambda args: args.num_experts, "`num_experts`"),
    "expert ffn": (megatron_args.expert_ffn_size, "`moe_ffn_hidden_size`, else ffn"),
    "shared ffn": (lambda args: args.moe_shared_expert_intermediate_size, "`moe_shared_expert_intermediate_size`"),
    "q_lora_rank": (lambda args: args.q_lora_rank, "`q_lora_rank`"),
    "kv_lora_rank": (lambda args: args.kv_lora_rank, "`kv_lora_rank`"),
    "heads x (qk_head_dim + qk_pos_emb_head_dim)": (
        lambda args: args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim),
        "`qk_head_dim`, `qk_pos_emb_head_dim`"),
    "kv_lora_rank + qk_pos_emb_head_dim": (lambda args: args.kv_lora_rank + args.qk_pos_emb_head_dim,
                                           "`kv_lora_rank`, `qk_pos_emb_head_dim`"),
    "heads x (qk_head_dim + v_head_dim)": (lambda args: args.num_attention_heads * (args.qk_head_dim + args.v_head_dim),
                                           "`qk_head_dim`, `v_head_dim`"),
    "heads x v_head_dim": (lambda args: args.num_attention_heads * args.v_head_dim, "`v_head_dim`"),
}
BUILT_IN_DIMENSIONS = tuple(DIMENSIONS)  # the rest are registered by plugins (register_dimension)


def register_dimension(name, size, meaning=""):
    """A dimension for registered keys' shapes: `size(args)` gives it from the Megatron args."""
    require(name not in DIMENSIONS or DIMENSIONS[name][0] is size, f"dimension {name!r} is already defined")
    DIMENSIONS[name] = (size, meaning)


@dataclasses.dataclass(frozen=True)
class LayerKey:
    """One key of a layer message and the Megatron parameter that holds it. Several keys on one parameter
    (SwiGLU's halves W then V; a fused projection's parts, in table order) all have split SWIGLU: each is split
    over TP on its own and rank r holds its slices one after another. A parameter name with "{}" holds one expert
    (the number local to its expert-parallel rank); the message then holds every expert stacked."""

    name: str               # the message key
    shape: tuple            # names from DIMENSIONS (or fixed ints), e.g. ("heads",)
    split: str              # one of SPLITS, for the local spec
    core: str               # Megatron-Core's local-spec name inside one layer, e.g. "self_attention.linear_qkv.weight"
    when: Condition = ALWAYS
    description: str = ""
    te: str = None          # TransformerEngine's name, where it differs from `core`
    te_split: str = None    # TransformerEngine's split, where it differs from `split`
    grouped: str = None     # an expert tensor's name in TEGroupedMLP ("{}" for the expert)
    legacy: str = None      # legacy Megatron-LM's name, where it differs from `core`
    dtype: torch.dtype = None  # a dtype the key always has; None: the model's
    mtp_part: bool = False  # a part of a multi-token-prediction layer around its transformer layer
    # torch_dist: this part of a fused parameter (split SWIGLU) is its own tensor "<parameter>.<dist_part>",
    # split over TP by rows, as megatron-core's sharded_state_dict declares some fused parameters; None: whole
    dist_part: str = None

    def __post_init__(self):
        if not isinstance(self.when, Condition):  # a plain function of (args, layer index)
            text = (self.when.__doc__ or self.when.__name__).strip().splitlines()[0]
            object.__setattr__(self, "when", Condition(text, self.when))

    @property
    def experts(self):
        return "{}" in self.core

    def parameter(self, spec, grouped_experts=False, mtp=False):
        """The parameter's name inside one layer under `spec` (LOCAL, TRANSFORMER_ENGINE or LEGACY);
        `grouped_experts`: TransformerEngine's TEGroupedMLP names experts; `mtp`: inside a
        multi-token-prediction layer (mtp.layers.i.), whose transformer layer is its `transformer_layer.`."""
        if spec == TRANSFORMER_ENGINE:
            name = (grouped_experts and self.grouped) or self.te or self.core
        else:
            name = (spec == LEGACY and self.legacy) or self.core
        return MTP_TRANSFORMER_LAYER + name if mtp and not self.mtp_part else name

    def tp_split(self, spec):
        return (spec == TRANSFORMER_ENGINE and self.te_split) or self.split

    def size(self, args):
        """The full (unsplit) shape of this key for a model of `args`."""
        return tuple(DIMENSIONS[dim][0](args) if isinstance(dim, str) else dim for dim in self.shape)

    def stored_dtype(self, dtype):
        """The dtype a message tensor of this key is written in, for a model of `dtype`."""
        return self.dtype or dtype


_Q_LORA = MLA & flag("q_lora_rank")
_QK_NORM = ~MLA & SOFTMAX & flag("qk_layernorm")  # per-head norms: head_dim wide, the same on every rank
_NO_Q_LORA = MLA & Condition("no `q_lora_rank`", lambda args, index: not args.q_lora_rank)
_SWIGLU_MLP, _PLAIN_MLP = DENSE & flag("swiglu"), DENSE & Condition("no `swiglu`", lambda args, index: not args.swiglu)
_MLA_NOTE = "; in TransformerEngine's spec the down projections are whole on every rank (TELinear, duplicated)"
_EXPERTS_FC1 = "mlp.experts.local_experts.{}.linear_fc1.weight"
_EXPERTS_FC2 = "mlp.experts.local_experts.{}.linear_fc2.weight"

MTP_TRANSFORMER_LAYER = "transformer_layer."  # the transformer layer's prefix inside an MTP layer

# The parts of a multi-token-prediction layer around its transformer layer (megatron-core's
# MultiTokenPredictionLayer): the layer at depth k normalises the embedding of token i + k (enorm) and the
# previous depth's hidden state of token i (hnorm), projects [embedding; hidden] back to hidden size
# (eh_proj), runs its transformer layer and normalises the result (final_layernorm) for the shared output
# layer. Their names are inside mtp.layers.i. in both specs.
_MTP_PARTS = dict(when=MTP, mtp_part=True)
MTP_BEFORE = (
    LayerKey("enorm weight", ("hidden",), REPLICATED, "enorm.weight", description="MTP: norm of the next token's "
             "embedding", **_MTP_PARTS),
    LayerKey("enorm bias", ("hidden",), REPLICATED, "enorm.bias", description="its bias (LayerNorm)",
             **dict(_MTP_PARTS, when=MTP & LAYER_NORM)),
    LayerKey("hnorm weight", ("hidden",), REPLICATED, "hnorm.weight", description="MTP: norm of the previous depth's "
             "hidden state", **_MTP_PARTS),
    LayerKey("hnorm bias", ("hidden",), REPLICATED, "hnorm.bias", description="its bias (LayerNorm)",
             **dict(_MTP_PARTS, when=MTP & LAYER_NORM)),
    LayerKey("eh proj weight", ("hidden", "2 x hidden"), COLUMN, "eh_proj.weight", description="MTP: projection of "
             "[normed embedding; normed hidden state] (columns in that order) to the transformer layer's input",
             **_MTP_PARTS),
)
MTP_AFTER = (
    LayerKey("final norm weight", ("hidden",), REPLICATED, "final_layernorm.weight", description="MTP: norm after the "
             "transformer layer, before the shared output layer", **_MTP_PARTS),
    LayerKey("final norm bias", ("hidden",), REPLICATED, "final_layernorm.bias", description="its bias (LayerNorm)",
             **dict(_MTP_PARTS, when=MTP & LAYER_NORM)),
)

# The built-in keys, in the order a layer's tensors are written (variants of one key for different
# layers, e.g. a dense and a MoE "mlp l1 weight", are exclusive).
BUILT_IN = (
    LayerKey("input norm weight", ("hidden",), REPLICATED, "input_layernorm.weight", ~MLA & SOFTMAX,
             "norm before attention",
             te="self_attention.linear_qkv.layer_norm_weight", legacy="input_norm.weight"),
    LayerKey("input norm weight", ("hidden",), REPLICATED, "input_layernorm.weight", MLA,
             "norm before attention (a separate module in MLA layers of both specs)"),
    LayerKey("input norm bias", ("hidden",), REPLICATED, "input_layernorm.bias", ~MLA & SOFTMAX & LAYER_NORM,
             "its bias",
             te="self_attention.linear_qkv.layer_norm_bias", legacy="input_norm.bias"),
    LayerKey("input norm bias", ("hidden",), REPLICATED, "input_layernorm.bias", MLA & LAYER_NORM, "its bias"),
    LayerKey("q down weight", ("q_lora_rank", "hidden"), COLUMN, "self_attention.linear_q_down_proj.weight", _Q_LORA,
             "query down projection" + _MLA_NOTE, te_split=REPLICATED),
    LayerKey("q latent norm weight", ("q_lora_rank",), REPLICATED, "self_attention.q_layernorm.weight", _Q_LORA,
             "norm of the query latent (fused into the up projection in TransformerEngine's spec)",
             te="self_attention.linear_q_up_proj.layer_norm_weight"),
    LayerKey("q up weight", ("heads x (qk_head_dim + qk_pos_emb_head_dim)", "q_lora_rank"), COLUMN,
             "self_attention.linear_q_up_proj.weight", _Q_LORA,
             "query up projection: per head qk_head_dim rows, then qk_pos_emb_head_dim rope rows in Megatron-Core's "
             "interleaved-pair rope order"),
    LayerKey("q weight", ("heads x (qk_head_dim + qk_pos_emb_head_dim)", "hidden"), COLUMN,
             "self_attention.linear_q_proj.weight", _NO_Q_LORA, "the query projection, rows as q up weight's"),
    LayerKey("kv down weight", ("kv_lora_rank + qk_pos_emb_head_dim", "hidden"), COLUMN,
             "self_attention.linear_kv_down_proj.weight", MLA,
             "key/value latent projection: kv_lora_rank rows, then the shared rope key's rows (interleaved rope "
             "order)" + _MLA_NOTE, te_split=REPLICATED),
    LayerKey("kv latent norm weight", ("kv_lora_rank",), REPLICATED, "self_attention.kv_layernorm.weight", MLA,
             "norm of the key/value latent (fused into the up projection in TransformerEngine's spec)",
             te="self_attention.linear_kv_up_proj.layer_norm_weight"),
    LayerKey("kv up weight", ("heads x (qk_head_dim + v_head_dim)", "kv_lora_rank"), COLUMN,
             "self_attention.linear_kv_up_proj.weight", MLA,
             "key/value up projection: per head qk_head_dim key rows, then v_head_dim value rows"),
    LayerKey("qkv weight", ("(heads + 2 groups) x head_dim", "hidden"), COLUMN, "self_attention.linear_qkv.weight",
             ~MLA & SOFTMAX & _UNGATED,
             "query, key, value rows grouped per KV head: per group, heads/groups query heads, then one key head, "
             "then one value head", legacy="self_attention.query_key_value.weight"),
    LayerKey("qkv bias", ("(heads + 2 groups) x head_dim",), COLUMN, "self_attention.linear_qkv.bias",
             ~MLA & SOFTMAX & _UNGATED & QKV_BIAS,
             "the same rows' biases", legacy="self_attention.query_key_value.bias"),
    LayerKey("q norm weight", ("head_dim",), REPLICATED, "self_attention.q_layernorm.weight", _QK_NORM,
             "per-head query norm"),
    LayerKey("k norm weight", ("head_dim",), REPLICATED, "self_attention.k_layernorm.weight", _QK_NORM,
             "per-head key norm"),
    LayerKey("q norm bias", ("head_dim",), REPLICATED, "self_attention.q_layernorm.bias", _QK_NORM & LAYER_NORM,
             "its bias"),
    LayerKey("k norm bias", ("head_dim",), REPLICATED, "self_attention.k_layernorm.bias", _QK_NORM & LAYER_NORM,
             "its bias"),
    LayerKey("dense weight", ("hidden", "heads x head_dim"), ROW, "self_attention.linear_proj.weight", ~MLA & SOFTMAX,
             "attention output projection", legacy="self_attention.dense.weight"),
    LayerKey("dense weight", ("hidden", "heads x v_head_dim"), ROW, "self_attention.linear_proj.weight", MLA,
             "attention output projection", legacy="self_attention.dense.weight"),
    LayerKey("dense bias", ("hidden",), REPLICATED, "self_attention.linear_proj.bias",
             SOFTMAX & flag("add_bias_linear"),
             "its bias", legacy="self_attention.dense.bias"),
    LayerKey("post norm weight", ("hidden",), REPLICATED, "pre_mlp_layernorm.weight", DENSE, "norm before the MLP",
             te="mlp.linear_fc1.layer_norm_weight", legacy="post_attention_norm.weight"),
    LayerKey("post norm weight", ("hidden",), REPLICATED, "pre_mlp_layernorm.weight", MOE,
             "norm before the MLP (a separate module in MoE layers of both specs)"),
    LayerKey("post norm bias", ("hidden",), REPLICATED, "pre_mlp_layernorm.bias", DENSE & LAYER_NORM, "its bias",
             te="mlp.linear_fc1.layer_norm_bias", legacy="post_attention_norm.bias"),
    LayerKey("post norm bias", ("hidden",), REPLICATED, "pre_mlp_layernorm.bias", MOE & LAYER_NORM, "its bias"),
    LayerKey("router weight", ("experts", "hidden"), REPLICATED, "mlp.router.weight", MOE, "the router"),
    LayerKey("router expert bias", ("experts",), REPLICATED, "mlp.router.expert_bias",
             MOE & flag("moe_router_enable_expert_bias"),
             "the routing score bias; float32 whatever the model's dtype (Megatron-Core and the Hugging Face routers keep it so: "
             "a bf16 bias would change which experts are chosen)", dtype=torch.float32),
    LayerKey("mlp l0 weight W", ("experts", "expert ffn", "hidden"), SWIGLU, _EXPERTS_FC1, MOE,
             "every expert's SwiGLU gate projection, stacked", grouped="mlp.experts.linear_fc1.weight{}"),
    LayerKey("mlp l0 weight V", ("experts", "expert ffn", "hidden"), SWIGLU, _EXPERTS_FC1, MOE,
             "every expert's SwiGLU up projection, stacked", grouped="mlp.experts.linear_fc1.weight{}"),
    LayerKey("mlp l1 weight", ("experts", "hidden", "expert ffn"), ROW, _EXPERTS_FC2, MOE,
             "every expert's output projection, stacked", grouped="mlp.experts.linear_fc2.weight{}"),
    LayerKey("shared mlp l0 weight W", ("shared ffn", "hidden"), SWIGLU, "mlp.shared_experts.linear_fc1.weight",
             MOE & flag("moe_shared_expert_intermediate_size"), "shared experts' gate"),
    LayerKey("shared mlp l0 weight V", ("shared ffn", "hidden"), SWIGLU, "mlp.shared_experts.linear_fc1.weight",
             MOE & flag("moe_shared_expert_intermediate_size"), "shared experts' up"),
    LayerKey("shared mlp l1 weight", ("hidden", "shared ffn"), ROW, "mlp.shared_experts.linear_fc2.weight",
             MOE & flag("moe_shared_expert_intermediate_size"), "shared experts' output projection"),
    LayerKey("mlp l0 weight W", ("ffn", "hidden"), SWIGLU, "mlp.linear_fc1.weight", _SWIGLU_MLP,
             "SwiGLU gate projection", legacy="mlp.dense_h_to_4h.weight"),
    LayerKey("mlp l0 weight V", ("ffn", "hidden"), SWIGLU, "mlp.linear_fc1.weight", _SWIGLU_MLP,
             "SwiGLU up projection", legacy="mlp.dense_h_to_4h.weight"),
    LayerKey("mlp l0 bias W", ("ffn",), SWIGLU, "mlp.linear_fc1.bias", _SWIGLU_MLP & flag("add_bias_linear"),
             "gate bias", legacy="mlp.dense_h_to_4h.bias"),
    LayerKey("mlp l0 bias V", ("ffn",), SWIGLU, "mlp.linear_fc1.bias", _SWIGLU_MLP & flag("add_bias_linear"),
             "up bias", legacy="mlp.dense_h_to_4h.bias"),
    LayerKey("mlp l0 weight", ("ffn", "hidden"), COLUMN, "mlp.linear_fc1.weight", _PLAIN_MLP,
             "first MLP projection without SwiGLU", legacy="mlp.dense_h_to_4h.weight"),
    LayerKey("mlp l0 bias", ("ffn",), COLUMN, "mlp.linear_fc1.bias", _PLAIN_MLP & flag("add_bias_linear"),
             "first projection bias", legacy="mlp.dense_h_to_4h.bias"),
    LayerKey("mlp l1 weight", ("hidden", "ffn"), ROW, "mlp.linear_fc2.weight", DENSE, "MLP output projection",
             legacy="mlp.dense_4h_to_h.weight"),
    LayerKey("mlp l1 bias", ("hidden",), REPLICATED, "mlp.linear_fc2.bias", DENSE & flag("add_bias_linear"), "its bias",
             legacy="mlp.dense_4h_to_h.bias"),
)
BUILT_IN = MTP_BEFORE + BUILT_IN + MTP_AFTER  # MTP parts around the transformer layer's keys

_registered = {}  # name -> LayerKey, in registration order


def register_layer_key(key):
    """Add `key` (a LayerKey) to the layer messages of every model whose args `key.when` selects: our
    loaders read it from Megatron checkpoints and send it, our savers require it and write it, split as
    `key.split` says, after the built-in tensors. Registering a name again replaces its definition (a
    module imported again); a built-in key's name is refused."""
    require(isinstance(key, LayerKey), f"register_layer_key takes a LayerKey, got {type(key).__name__}")
    require(key.name not in {built_in.name for built_in in BUILT_IN}, f"{key.name!r} is a built-in message key")
    for split in (key.split, key.te_split or key.split):
        require(split in SPLITS, f"{key.name!r}: split {split!r} is not one of {', '.join(SPLITS)}")
    require(key.dist_part is None or key.split == SWIGLU,
            f"{key.name!r}: dist_part names a part of a fused parameter (split {SWIGLU!r})")
    unknown = [dim for dim in key.shape if isinstance(dim, str) and dim not in DIMENSIONS]
    require(not unknown, f"{key.name!r}: unknown dimensions {unknown} (register_dimension adds one)")
    _registered[key.name] = key
    DESCRIPTIONS.pop(key.name, None)
    _describe(key)


def all_keys():
    """Every key, built-in then registered."""
    return BUILT_IN + tuple(_registered.values())


def layer_keys(args, index=0):
    """The keys of transformer layer `index` of a model of `args`, in the order they are written; refuses
    the combinations the table does not describe. Index num_layers + i is multi-token-prediction layer i."""
    layers = args.num_layers + megatron_args.mtp_layers(args)
    require(0 <= index < layers, f"layer {index} is not one of the model's {layers} layers")
    moe = megatron_args.is_moe_layer(args, index)  # first: refuses a malformed moe_layer_freq
    if getattr(args, "multi_latent_attention", False):
        require(getattr(args, "qk_layernorm", False),
                "multi-latent attention without qk_layernorm (no latent norms) is not supported")
        require(not args.add_bias_linear and not args.add_qkv_bias,
                "multi-latent attention with linear biases is not supported")
    keys = [key for key in all_keys() if key.when(args, index)]
    if moe:
        require(args.swiglu or getattr(args, "quick_geglu", False), "mixture-of-experts layers need a gated MLP "
                                                                    "(swiglu or quick_geglu)")
        require(not args.add_bias_linear or any(key.experts and key.core.endswith(".bias") for key in keys),
                "mixture-of-experts layers with linear biases need keys for the expert biases (a plugin registers "
                "them)")
    return keys


def stored_dtype(name, dtype):
    """The dtype message tensor `name` is written in, for a model of `dtype`."""
    fixed = {key.name: key.dtype for key in all_keys() if key.dtype is not None}
    return fixed.get(name, dtype)


def _describe(key):
    """Enter `key` in DESCRIPTIONS; a key's variants (dense and MoE layers, ...) share one entry."""
    text = DESCRIPTIONS.get(key.name)
    DESCRIPTIONS[key.name] = key.description if not text or key.description in text else f"{text}; {key.description}"


DESCRIPTIONS = {}  # {key: what it holds}, every key once, registered ones included
for _key in BUILT_IN:
    _describe(_key)
