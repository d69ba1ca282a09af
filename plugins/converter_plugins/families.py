"""The built-in Hugging Face families, as data (the same form a third-party plugin uses)."""

import dataclasses

from converter_core import plugin
from converter_plugins import gpt_oss, minicpm, qwen3_next

# loader_llama_mistral.py's --model-size choices (Megatron-LM, last version 2026-03), accepted by the HF loaders.
MODEL_SIZES = ("llama2-7B", "llama2-13B", "llama2-70B", "llama2-7Bf", "llama2-13Bf", "llama2-70Bf", "llama3", "mistral",
               "yi-34B", "qwen2.5")

LLAMA = plugin.Family("llama", ("LlamaForCausalLM",), config={"attention_bias": False, "mlp_bias": False},
                      notes=("refuses attention_bias or mlp_bias set true (Megatron biases every projection, or q, k "
                             "and v only)",))
MISTRAL = plugin.Family("mistral", ("MistralForCausalLM",),
                        notes=("sliding_window stays in config.json only, as convert.py's Mistral loader does",))
QWEN2 = plugin.Family("qwen2", ("Qwen2ForCausalLM",), layer=plugin.LLAMA_LAYER + plugin.QKV_BIAS,
                      args={"add_qkv_bias": True}, notes=("biases on q, k and v (add_qkv_bias); sliding-window "
                                                          "settings stay in config.json only",))
# Qwen3 (dense): per-head RMSNorm on queries and keys, head_dim set apart from hidden / heads.
QWEN3 = plugin.Family("qwen3", ("Qwen3ForCausalLM",), layer=plugin.LLAMA_LAYER + plugin.QK_NORM,
                      args={"qk_layernorm": True}, config={"attention_bias": False},
                      notes=("per-head q and k norms (qk_layernorm)",))
# Mixtral: every layer a mixture of experts, softmax top-k renormalised; w1 gate, w3 up, w2 down.
MIXTRAL = plugin.Family(
    "mixtral", ("MixtralForCausalLM",), experts=plugin.Experts(),
    notes=("every layer a softmax top-k mixture of experts; EP layouts read and written",),
    layer=plugin.LLAMA_ATTENTION + plugin.experts("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.w1.weight",
                                                  "block_sparse_moe.experts.{}.w3.weight",
                                                  "block_sparse_moe.experts.{}.w2.weight"))
# Qwen3-MoE: Qwen3's attention; MoE layers except mlp_only_layers and off-step ones (decoder_sparse_step).
QWEN3_MOE = plugin.Family(
    "qwen3_moe", ("Qwen3MoeForCausalLM",), args={"qk_layernorm": True}, config={"attention_bias": False},
    layer=plugin.LLAMA_ATTENTION + plugin.QK_NORM + plugin.on_dense_layers(plugin.LLAMA_MLP) + plugin.experts(
        "mlp.gate.weight", "mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight",
        "mlp.experts.{}.down_proj.weight"),
    experts=plugin.Experts(count=("num_experts", "num_local_experts"), ffn="moe_intermediate_size",
                           normalize="norm_topk_prob", dense_layers="mlp_only_layers", sparse_step="decoder_sparse_step"),
    notes=("mlp_only_layers and decoder_sparse_step become Megatron's moe_layer_freq pattern",))
# DeepSeek-V3: multi-latent attention; the first layers dense, then MoE with sigmoid scores, a score
# correction bias (float32), group-limited routing, routed scaling and shared experts. That MLP side
# (DEEPSEEK_MLP, DEEPSEEK_EXPERTS) is GLM-4.5's too.
DEEPSEEK_MLP = plugin.on_dense_layers(plugin.LLAMA_MLP) + plugin.experts(
    "mlp.gate.weight", "mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight",
    "mlp.experts.{}.down_proj.weight") + (plugin.Tensor("mlp.gate.e_score_correction_bias", "router expert bias",
                                                        when=plugin.MOE_LAYER),) + plugin.shared_experts(
    "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight")
DEEPSEEK_EXPERTS = plugin.Experts(
    count=("n_routed_experts",), ffn="moe_intermediate_size", normalize="norm_topk_prob",
    first_dense="first_k_dense_replace", score="sigmoid", expert_bias=True, groups=("n_group", "topk_group"),
    scaling="routed_scaling_factor", shared="n_shared_experts")
DEEPSEEK_V3 = plugin.Family(
    "deepseek_v3", ("DeepseekV3ForCausalLM",), mla=plugin.Mla(rope_interleaved="rope_interleave"),
    layer=plugin.MLA_ATTENTION + DEEPSEEK_MLP, experts=DEEPSEEK_EXPERTS,
    config={"attention_bias": False}, mtp=plugin.Mtp(),
    notes=("multi-latent attention, sigmoid routing with score bias, groups and shared experts",
           "grouped routing only where num_experts_per_tok = 2 x topk_group"))
# GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air: Llama's attention with q/k/v biases (attention_bias), optional per-head
# q/k norms (use_qk_norm), rotate-half rope on part of each head (partial_rotary_factor) and head_dim set apart;
# DeepSeek-V3's MLP side: the first layers dense, then sigmoid routing with a score-correction bias, groups,
# routed scaling and shared experts. Releases add one MTP layer, stored as layer num_hidden_layers.
GLM4_MOE = plugin.Family(
    "glm4_moe", ("Glm4MoeForCausalLM",), features=(), experts=DEEPSEEK_EXPERTS,
    layer=plugin.LLAMA_ATTENTION + plugin.QKV_BIAS + plugin.QK_NORM + DEEPSEEK_MLP,
    fields={"partial_rotary_factor": "rotary_percent", "attention_bias": "add_qkv_bias", "use_qk_norm": "qk_layernorm"},
    config={"num_nextn_predict_layers": 0}, mtp=plugin.Mtp(),
    notes=("q/k/v biases (attention_bias -> add_qkv_bias), per-head q/k norms when use_qk_norm (qk_layernorm), "
           "partial rotary (partial_rotary_factor -> rotary_percent); first_k_dense_replace dense layers, then sigmoid "
           "routing with score bias, groups, routed scaling and shared experts",
           "grouped routing only where num_experts_per_tok = 2 x topk_group (GLM releases use one group)"))
# Kimi-K2: DeepSeek-V3's architecture and tensor names under its own model_type, with its own remote code.
KIMI_K2 = dataclasses.replace(
    DEEPSEEK_V3, model_type="kimi_k2", config={**DEEPSEEK_V3.config, "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}},
    notes=("DeepSeek-V3's mapping (multi-latent attention, sigmoid routing with score bias, groups and shared "
           "experts); model_type, auto_map and rope_scaling kept as released",))
# MiniCPM 1/2/4: Llama weights plus muP scalars; tied unless the config says otherwise (the remote default).
# MiniCPM-MoE (same model_type and code, with num_experts): every layer's MLP a softmax top-k renormalised
# mixture of experts named w1 (gate), w3 (up), w2 (down), as vLLM's loader reads them.
MINICPM = plugin.Family(
    "minicpm", ("MiniCPMForCausalLM",), tied_by_default=True, features=minicpm.FEATURES,
    layer=plugin.LLAMA_ATTENTION + plugin.on_dense_layers(plugin.LLAMA_MLP) + plugin.experts(
        "mlp.gate.weight", "mlp.experts.{}.w1.weight", "mlp.experts.{}.w3.weight", "mlp.experts.{}.w2.weight"),
    experts=plugin.Experts(count=("num_experts",), optional=True),
    notes=("muP scalars and LongRoPE carried in the Megatron args",
           "--saver llama_hf writes a dense MiniCPM as a plain Llama with the scalars folded in; it refuses "
           "MiniCPM-MoE (experts) and sparse_config (InfLLM v2 sparse attention)"), config={"auto_map": {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}})
# MiniCPM3: DeepSeek's multi-latent attention with rotate-half rope (its rows are reordered for
# Megatron-Core), a dense MLP and MiniCPM's muP scalars; tied unless the config says otherwise.
MINICPM3 = plugin.Family("minicpm3", ("MiniCPM3ForCausalLM",), mla=plugin.Mla(rope_interleaved=False),
                         features=minicpm.FEATURES, tied_by_default=True, layer=plugin.MLA_ATTENTION + plugin.LLAMA_MLP,
                         config={"attention_bias": False},
                         notes=("muP scalars and LongRoPE carried in the Megatron args; rope rows reordered for "
                                "Megatron-Core's interleaved MLA rope",
                                "--saver llama_hf refuses it (multi-latent attention has no Llama form)"))

LLAMA_FAMILIES = plugin.by_model_type(LLAMA, MISTRAL, QWEN2)
MINICPM_FAMILIES = plugin.by_model_type(MINICPM, MINICPM3)
# The generic hf plugins' families; for a stream with no HF config, the first that fits is written.
ALL_FAMILIES = plugin.by_model_type(LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE, DEEPSEEK_V3, KIMI_K2, GLM4_MOE,
                                    MINICPM, MINICPM3, gpt_oss.GPT_OSS, qwen3_next.QWEN3_NEXT)
