"""Saver for Megatron-Core checkpoints (per-rank torch files), convert.py's core/mcore saver."""

from converter_core import mcore_stream


def add_arguments(parser):
    mcore_stream.add_saver_arguments(parser, "Megatron-Core saver")


def save_checkpoint(queue, args):
    mcore_stream.save(queue, args)
