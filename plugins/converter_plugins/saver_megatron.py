"""Saver for legacy Megatron-LM GPT checkpoints (convert.py's megatron/legacy saver), any TP/PP."""

from converter_core import plugin

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("legacy",)  # written


def add_arguments(parser):
    plugin.add_megatron_saver_arguments(parser, "Legacy Megatron-LM saver", default_impl="local")


def save_checkpoint(queue, args):
    plugin.save_megatron(queue, args, "legacy")


def finish_share(args, pieces):
    """Finish a job split over ranks, once each rank wrote its own files (docs/plugins.md)."""
    plugin.finish_megatron_share(args, pieces)
