"""Loader for Hugging Face Llama 2/3/3.x, Mistral and Qwen2 folders (convert.py's llama_mistral)."""

from converter_core import plugin
from converter_plugins.families import MODEL_SIZES, LLAMA_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = LLAMA_FAMILIES


def add_arguments(parser):
    plugin.add_hf_loader_arguments(parser, "Llama/Mistral/Qwen2 Hugging Face loader", MODEL_SIZES)


def load_checkpoint(queue, args):
    plugin.load_hf(queue, args, FAMILIES)
