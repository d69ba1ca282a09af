"""Loader for Megatron-Core checkpoints (per-rank torch files or torch_dist), convert.py's core/mcore
loader. Legacy Megatron-LM checkpoints are recognised too."""

from converter_core import plugin

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("torch", "torch_dist", "legacy")  # read, whichever the plugin name


def add_arguments(parser):
    plugin.add_megatron_loader_arguments(parser, "Megatron-Core loader")


def load_checkpoint(queue, args):
    plugin.load_megatron(queue, args)
