"""Saver for Hugging Face MiniCPM folders that MiniCPM's remote code loads (scalars always explicit)."""

from converter_core import hf_family, hf_stream

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = hf_family.MINICPM_FAMILIES  # what supported() reports
NOTES = ("muP scalars and LongRoPE carried in the Megatron args; --saver llama_hf writes a plain Llama with the "
         "scalars folded in")


def add_arguments(parser):
    hf_stream.add_saver_arguments(parser, "MiniCPM Hugging Face saver")


def save_checkpoint(queue, args):
    hf_stream.save(queue, args, hf_family.MINICPM_FAMILIES)
