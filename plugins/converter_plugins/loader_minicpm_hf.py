"""Loader for Hugging Face MiniCPM 1/2/4 folders (MiniCPMForCausalLM); the muP scalars and LongRoPE
travel in the Megatron args under the names Megatron forks use for MiniCPM."""

from converter_core import plugin
from converter_plugins.families import MODEL_SIZES, MINICPM_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = MINICPM_FAMILIES


def add_arguments(parser):
    plugin.add_hf_loader_arguments(parser, "MiniCPM Hugging Face loader", MODEL_SIZES)


def load_checkpoint(queue, args):
    plugin.load_hf(queue, args, FAMILIES)
