"""Loader for Megatron-Core checkpoints (per-rank torch files), convert.py's core/mcore loader.
Legacy Megatron-LM checkpoints are recognised too."""

from converter_core import megatron_stream, protocol

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("torch", "torch_dist", "legacy")  # read, whichever the plugin name


def add_arguments(parser):
    megatron_stream.add_loader_arguments(parser, "Megatron-Core loader")


def load_checkpoint(queue, args):
    with protocol.exit_on_failure(queue):
        megatron_stream.load(queue, args)
