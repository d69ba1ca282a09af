"""Saver for legacy Megatron-LM GPT checkpoints (convert.py's megatron/legacy saver), any TP/PP."""

from converter_core import megatron_schema, megatron_stream
from converter_core.errors import require

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("legacy",)  # written


def add_arguments(parser):
    megatron_stream.add_saver_arguments(parser, "Legacy Megatron-LM saver", default_impl="local")


def save_checkpoint(queue, args):
    require(args.saver_transformer_impl == "local",
            "the legacy saver writes local (non-TransformerEngine) names only; drop --saver-transformer-impl")
    megatron_stream.save(queue, args, megatron_schema.LegacySchema())
