"""Loader for legacy Megatron-LM GPT checkpoints (convert.py's megatron/legacy loader), any TP/PP.
Megatron-Core checkpoints are recognised too."""

from converter_core import plugin

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("torch", "torch_dist", "legacy")  # read, whichever the plugin name


def add_arguments(parser):
    plugin.add_megatron_loader_arguments(parser, "Legacy Megatron-LM loader", default_impl="local")


def load_checkpoint(queue, args):
    plugin.load_megatron(queue, args)
