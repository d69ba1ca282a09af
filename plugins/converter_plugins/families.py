"""The built-in Hugging Face families, as data (the same form a third-party plugin uses)."""

from converter_core import plugin

LLAMA = plugin.Family("llama", ("LlamaForCausalLM",), config={"attention_bias": False, "mlp_bias": False})
MISTRAL = plugin.Family("mistral", ("MistralForCausalLM",))
QWEN2 = plugin.Family("qwen2", ("Qwen2ForCausalLM",), layer=plugin.LLAMA_LAYER + plugin.QKV_BIAS,
                      args={"add_qkv_bias": True})
# MiniCPM 1/2/4: Llama weights plus muP scalars; tied unless the config says otherwise (the remote default).
MINICPM = plugin.Family("minicpm", ("MiniCPMForCausalLM",), tied_by_default=True, mup=True, config={"auto_map": {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}})

LLAMA_FAMILIES = plugin.by_model_type(LLAMA, MISTRAL, QWEN2)
MINICPM_FAMILIES = plugin.by_model_type(MINICPM)
MINICPM_NOTES = ("muP scalars and LongRoPE carried in the Megatron args; --saver llama_hf writes a plain Llama with "
                 "the scalars folded in",)
