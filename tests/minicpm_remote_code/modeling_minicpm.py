"""A stand-in for OpenBMB's modeling_minicpm.py (remote code), for tests: transformers' Llama with
MiniCPM's multipliers (reference/minicpm.md section 2) applied by hooks: embeddings x scale_emb,
attention and MLP outputs x scale_depth / sqrt(layers), the final hidden state / (hidden / dim_model_base).
LongRoPE is not implemented here; such a config is refused rather than computed differently."""

import math

from transformers import LlamaForCausalLM, LlamaModel

from .configuration_minicpm import MiniCPMConfig


def _times(factor):
    return lambda module, inputs, output: output * factor


class MiniCPMForCausalLM(LlamaForCausalLM):
    config_class = MiniCPMConfig

    def __init__(self, config):
        if getattr(config, "rope_scaling", None) and config.rope_scaling.get("rope_type", "default") != "default":
            raise NotImplementedError("this test stand-in computes plain rope only")
        super().__init__(config)
        self.model.embed_tokens.register_forward_hook(_times(config.scale_emb))
        depth = config.scale_depth / math.sqrt(config.num_hidden_layers)
        for layer in self.model.layers:
            layer.self_attn.o_proj.register_forward_hook(_times(depth))
            layer.mlp.down_proj.register_forward_hook(_times(depth))
        width = config.hidden_size / config.dim_model_base
        self.lm_head.register_forward_pre_hook(lambda module, inputs: (inputs[0] / width,))


MiniCPMModel = LlamaModel
MiniCPMForSequenceClassification = MiniCPMForCausalLM
