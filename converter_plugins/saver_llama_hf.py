"""Saver for Hugging Face Llama, Mistral or Qwen2 folders (whichever the stream describes)."""

from converter_core import hf_family, hf_stream

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = hf_family.LLAMA_FAMILIES  # what supported() reports


def add_arguments(parser):
    hf_stream.add_saver_arguments(parser, "Llama/Mistral/Qwen2 Hugging Face saver")


def save_checkpoint(queue, args):
    hf_stream.save(queue, args)
