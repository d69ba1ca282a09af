"""Loader for Megatron-Core checkpoints (per-rank torch files), convert.py's core/mcore loader."""

from converter_core import mcore_stream


def add_arguments(parser):
    mcore_stream.add_loader_arguments(parser, "Megatron-Core loader")


def load_checkpoint(queue, args):
    mcore_stream.load(queue, args)
