"""Loader for Hugging Face MiniCPM 1/2/4 folders (MiniCPMForCausalLM); the muP scalars and LongRoPE
travel in the Megatron args under the names Megatron forks use for MiniCPM."""

from converter_core import hf_family, hf_stream, protocol

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = hf_family.MINICPM_FAMILIES  # what supported() reports
NOTES = ("muP scalars and LongRoPE carried in the Megatron args; --saver llama_hf writes a plain Llama with the "
         "scalars folded in")


def add_arguments(parser):
    hf_stream.add_loader_arguments(parser, "MiniCPM Hugging Face loader")


def load_checkpoint(queue, args):
    with protocol.exit_on_failure(queue):
        hf_stream.load(queue, args, hf_family.MINICPM_FAMILIES)
