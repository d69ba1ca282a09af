"""Phi-3 as a converter_core family: Llama's layout with q, k and v fused in one qkv_proj ([q; k; v]
rows) and the SwiGLU gate and up fused in one gate_up_proj ([gate; up] rows)."""

from converter_core import plugin

PHI3 = plugin.Family(
    "phi3", ("Phi3ForCausalLM",),
    layer=(
        plugin.Tensor("input_layernorm.weight", "input norm weight"),
        plugin.Tensor("self_attn.qkv_proj.weight", "qkv weight", plugin.FUSED_QKV),
        plugin.Tensor("self_attn.o_proj.weight", "dense weight"),
        plugin.Tensor("post_attention_layernorm.weight", "post norm weight"),
        plugin.Tensor("mlp.gate_up_proj.weight", ("mlp l0 weight W", "mlp l0 weight V"), plugin.FUSED_GATE_UP),
        plugin.Tensor("mlp.down_proj.weight", "mlp l1 weight"),
    ),
    fields={"partial_rotary_factor": "rotary_percent"},  # rotary on the first part of each head: Megatron's too
    notes=("example third-party plugin (plugins/converter-phi3); sliding_window stays in config.json only, as "
           "convert.py's Mistral loader does",),
)
FAMILIES = plugin.by_model_type(PHI3)
