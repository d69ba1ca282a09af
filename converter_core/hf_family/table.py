"""A family's layer table: rows naming HF tensors inside a layer, the message keys they fill, and the
kind of mapping between them. Kinds are objects with two inverse directions, so a plugin can add its
own (an offset norm, a transposed or interleaved expert tensor) without editing core."""

import dataclasses

import torch

from converter_core import layout
from converter_core.megatron import args as megatron_args
from converter_core.megatron.keys import Condition

# `when` values that depend on the layer, not the model: rows of MoE layers and of dense (MLP) layers.
MOE_LAYER, DENSE_LAYER = "moe layer", "dense layer"


class Kind:
    """How one row's HF tensors become message tensors and back. `to_megatron` and `to_hf` must be
    inverses (tests/test_kinds.py checks each built-in kind); `hf_shapes` follows from the message shapes."""

    def hf_shapes(self, row, shapes, args):
        """(name inside the layer, shape) of the row's HF tensors; `shapes`: the layer message's {key: shape}."""
        return [(name, shapes[key]) for name, key in zip(row.hf_names, row.keys)]

    def to_megatron(self, row, hf, args, family):
        """{message key: tensor} from `hf` ({name inside the layer: tensor})."""
        return {key: hf[name] for name, key in zip(row.hf_names, row.keys)}

    def to_hf(self, row, message, args, family):
        """{name inside the layer: tensor}, popping the row's keys from `message`. A tensor may be a tuple
        of row blocks or layout.Columns (written without copying)."""
        return {name: message.pop(key) for name, key in zip(row.hf_names, row.keys)}


class Copy(Kind):
    """Each HF tensor is one message tensor (names and keys pair up)."""


class Qkv(Kind):
    """HF q, k, v (weights or biases), or one fused [q; k; v] tensor -> Megatron's grouped qkv."""

    def __init__(self, fused=False):
        self.fused = fused

    def hf_shapes(self, row, shapes, args):
        first = shapes[row.key]
        if self.fused:
            return [(row.hf, first)]
        return [(name, (size, *first[1:])) for name, size in zip(row.hf_names, qkv_sizes(args)[3])]

    def to_megatron(self, row, hf, args, family):
        heads, groups, head_dim, sizes = qkv_sizes(args)
        q, k, v = torch.split(hf[row.hf], sizes) if self.fused else (hf[name] for name in row.hf_names)
        return {row.key: layout.hf_qkv_to_megatron(q, k, v, heads, groups, head_dim)}

    def to_hf(self, row, message, args, family):
        heads, groups, head_dim, _ = qkv_sizes(args)
        q, k, v = layout.megatron_qkv_to_hf(message.pop(row.key), heads, groups, head_dim)
        return {row.hf: q + k + v} if self.fused else dict(zip(row.hf_names, (q, k, v)))


class FusedGateUp(Kind):
    """One HF [gate; up] tensor -> the SwiGLU halves "mlp l0 weight W" and "V"."""

    def hf_shapes(self, row, shapes, args):
        first = shapes[row.keys[0]]
        return [(row.hf, (2 * first[0], *first[1:]))]

    def to_megatron(self, row, hf, args, family):
        return dict(zip(row.keys, torch.chunk(hf[row.hf], 2)))

    def to_hf(self, row, message, args, family):
        return {row.hf: layout.concat_rows([message.pop(key) for key in row.keys])}


class PerExpert(Kind):
    """One HF tensor per expert ("{}" in the name: the expert number) -> the experts stacked."""

    def hf_shapes(self, row, shapes, args):
        count = shapes[row.keys[0]][0]
        return [(name.format(e), shapes[key][1:]) for e in range(count) for name, key in zip(row.hf_names, row.keys)]

    def to_megatron(self, row, hf, args, family):
        return {key: torch.stack([hf[name.format(e)] for e in range(args.num_experts)])
                for name, key in zip(row.hf_names, row.keys)}

    def to_hf(self, row, message, args, family):
        return {name.format(e): expert for name, key in zip(row.hf_names, row.keys)
                for e, expert in enumerate(message.pop(key))}


class MlaRope(Kind):
    """Multi-latent attention rows whose rope part Megatron-Core reads as interleaved pairs (x0, x1),
    (x2, x3), ...: a family whose rope rotates halves (x_j with x_{j+d/2}) has them reordered. `query`:
    per head [nope | rope] rows (else the [kv latent | rope key] rows)."""

    def __init__(self, query):
        self.query = query

    def _reordered(self, tensor, args, family, to_megatron):
        if family.mla_rope_interleaved(args):
            return tensor
        rope = args.qk_pos_emb_head_dim
        block = args.qk_head_dim + rope if self.query else args.kv_lora_rank + rope
        return layout.interleave_rope_rows(tensor, block, rope, inverse=not to_megatron)

    def to_megatron(self, row, hf, args, family):
        return {row.key: self._reordered(hf[row.hf], args, family, to_megatron=True)}

    def to_hf(self, row, message, args, family):
        return {row.hf: self._reordered(layout.tensor_of(message.pop(row.key)), args, family, to_megatron=False)}


COPY = Copy()                    # each HF tensor is one message tensor
QKV = Qkv()                      # HF q, k, v -> Megatron's grouped qkv (weights or biases)
FUSED_QKV = Qkv(fused=True)      # one HF [q; k; v] tensor -> Megatron's grouped qkv
FUSED_GATE_UP = FusedGateUp()    # one HF [gate; up] tensor -> "mlp l0 weight W" / "V"
EXPERTS = PerExpert()            # one HF tensor per expert -> stacked
MLA_Q = MlaRope(query=True)      # MLA query rows, per head [nope | rope]
MLA_KV_DOWN = MlaRope(query=False)  # MLA [kv latent | rope key] rows


def qkv_sizes(args):
    heads, groups, head_dim = args.num_attention_heads, megatron_args.query_groups(args), megatron_args.head_dim(args)
    return heads, groups, head_dim, [heads * head_dim, groups * head_dim, groups * head_dim]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One row of a family's layer table. `hf`: name(s) inside a layer ("self_attn.q_proj.weight");
    `key`: message key(s); `kind`: a Kind (COPY, QKV, ...); `when`: whether the row exists in a layer:
    a Megatron args attribute that must be true ("add_qkv_bias"; "not q_lora_rank": false), MOE_LAYER /
    DENSE_LAYER, a Condition (as message keys use: of the args and the layer index, e.g. plugin.LINEAR_ATTENTION),
    or a function of (args, moe) for anything else."""
    hf: object
    key: object
    kind: Kind = COPY
    when: object = None

    @property
    def hf_names(self):
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    @property
    def keys(self):
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)

    def present(self, args, moe, index=0):
        """Whether the row exists in layer `index` (`moe`: it is a MoE layer) of a model with Megatron args `args`."""
        when = self.when
        if when is None:
            return True
        if isinstance(when, Condition):
            return when(args, index)
        if callable(when):
            return bool(when(args, moe))
        if when in (MOE_LAYER, DENSE_LAYER):
            return moe == (when == MOE_LAYER)
        if when.startswith("not "):
            return not getattr(args, when[4:], False)
        return bool(getattr(args, when, False))


# Llama's attention rows: norm, q/k/v into the grouped qkv, output projection, the MLP's norm.
LLAMA_ATTENTION = (
    Tensor("input_layernorm.weight", "input norm weight"),
    Tensor(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv weight", QKV),
    Tensor("self_attn.o_proj.weight", "dense weight"),
    Tensor("post_attention_layernorm.weight", "post norm weight"),
)
# Llama's SwiGLU MLP rows: gate and up into the two halves, down.
LLAMA_MLP = (
    Tensor(("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("mlp l0 weight W", "mlp l0 weight V")),
    Tensor("mlp.down_proj.weight", "mlp l1 weight"),
)
LLAMA_LAYER = LLAMA_ATTENTION + LLAMA_MLP  # a whole Llama layer
# Biases on q, k and v only; Megatron's add_qkv_bias.
QKV_BIAS = (Tensor(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv bias", QKV,
                   when="add_qkv_bias"),)
# Per-head RMSNorm of queries and keys; Megatron's qk_layernorm.
QK_NORM = (
    Tensor("self_attn.q_norm.weight", "q norm weight", when="qk_layernorm"),
    Tensor("self_attn.k_norm.weight", "k norm weight", when="qk_layernorm"),
)
# Multi-latent attention: low-rank query and key/value projections with latent norms, a rope key shared
# by the heads; without q_lora_rank the query is one projection.
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
