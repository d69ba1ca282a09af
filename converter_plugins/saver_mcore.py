"""Saver for Megatron-Core checkpoints (per-rank torch files), convert.py's core/mcore saver."""

from converter_core import megatron_schema, megatron_stream


def add_arguments(parser):
    megatron_stream.add_saver_arguments(parser, "Megatron-Core saver")


def save_checkpoint(queue, args):
    megatron_stream.save(queue, args, megatron_schema.CoreSchema(args.saver_transformer_impl))
