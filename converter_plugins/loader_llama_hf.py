"""Loader for Hugging Face Llama 2/3/3.x, Mistral and Qwen2 folders (convert.py's llama_mistral)."""

from converter_core import hf_family, hf_stream, protocol

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = hf_family.LLAMA_FAMILIES  # what supported() reports


def add_arguments(parser):
    hf_stream.add_loader_arguments(parser, "Llama/Mistral/Qwen2 Hugging Face loader")


def load_checkpoint(queue, args):
    with protocol.exit_on_failure(queue):
        hf_stream.load(queue, args)
