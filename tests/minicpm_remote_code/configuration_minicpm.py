"""A stand-in for OpenBMB's configuration_minicpm.py (remote code), for tests: the real one cannot be
downloaded here. Like it, a Llama config plus MiniCPM's three muP scalars."""

from transformers import LlamaConfig


class MiniCPMConfig(LlamaConfig):
    model_type = "minicpm"

    def __init__(self, scale_emb=1, scale_depth=1, dim_model_base=1, **kwargs):
        self.scale_emb, self.scale_depth, self.dim_model_base = scale_emb, scale_depth, dim_model_base
        super().__init__(**kwargs)
