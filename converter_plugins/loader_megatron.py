"""Loader for legacy Megatron-LM GPT checkpoints (convert.py's megatron/legacy loader), any TP/PP.
Megatron-Core checkpoints are recognised too."""

from converter_core import megatron_stream


def add_arguments(parser):
    megatron_stream.add_loader_arguments(parser, "Legacy Megatron-LM loader", default_impl="local")


def load_checkpoint(queue, args):
    megatron_stream.load(queue, args)
