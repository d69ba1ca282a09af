"""A stand-in for OpenBMB's modeling_minicpm.py (remote code), for tests: transformers' Llama with
MiniCPM's multipliers (reference/minicpm.md section 2) applied by hooks: embeddings x scale_emb,
attention and MLP outputs x scale_depth / sqrt(layers), the final hidden state / (hidden / dim_model_base).
LongRoPE is computed as OpenBMB's MiniCPMLongRoPE does; other rope scaling is refused rather than
computed differently."""

import math

import torch
from transformers import LlamaForCausalLM, LlamaModel

from .configuration_minicpm import MiniCPMConfig


def _times(factor):
    return lambda module, inputs, output: output * factor


class MiniCPMLongRoPE(torch.nn.Module):
    """OpenBMB's MiniCPMLongRoPE: its cos/sin cache is built for max_position_embeddings and grows to the
    length of any longer input (never shrinks); long factors while the cache is longer than
    original_max_position_embeddings, else short; cos and sin times sqrt(1 + ln(max / orig) / ln(orig))."""

    def __init__(self, config):
        super().__init__()
        rope = config.rope_parameters
        self.theta, self.dim = rope["rope_theta"], config.hidden_size // config.num_attention_heads
        self.short, self.long = rope["short_factor"], rope["long_factor"]
        self.original = rope["original_max_position_embeddings"]
        self.cached = config.max_position_embeddings
        self.multiplier = math.sqrt(1 + math.log(self.cached / self.original) / math.log(self.original))

    def forward(self, x, position_ids):
        self.cached = max(self.cached, int(position_ids.max()) + 1)
        factors = torch.tensor(self.long if self.cached > self.original else self.short, device=x.device)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=x.device).float() / self.dim))
        freqs = position_ids[..., None].float() * (1.0 / factors) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.multiplier).to(x.dtype), (emb.sin() * self.multiplier).to(x.dtype)


class MiniCPMForCausalLM(LlamaForCausalLM):
    config_class = MiniCPMConfig

    def __init__(self, config):
        kind = config.rope_parameters.get("rope_type", "default")
        if kind not in ("default", "longrope"):
            raise NotImplementedError(f"this test stand-in computes plain rope and LongRoPE only, not {kind}")
        super().__init__(config)
        if kind == "longrope":
            self.model.rotary_emb = MiniCPMLongRoPE(config)
        self.model.embed_tokens.register_forward_hook(_times(config.scale_emb))
        depth = config.scale_depth / math.sqrt(config.num_hidden_layers)
        for layer in self.model.layers:
            layer.self_attn.o_proj.register_forward_hook(_times(depth))
            layer.mlp.down_proj.register_forward_hook(_times(depth))
        width = config.hidden_size / config.dim_model_base
        self.lm_head.register_forward_pre_hook(lambda module, inputs: (inputs[0] / width,))
