"""Saver for Megatron-Core checkpoints (per-rank torch files or torch_dist), convert.py's core/mcore saver."""

from converter_core import megatron_schema, megatron_stream

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("torch", "torch_dist")  # written (--ckpt-format)


def add_arguments(parser):
    megatron_stream.add_saver_arguments(parser, "Megatron-Core saver")
    parser.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                        help="per-rank torch files (default, as convert.py) or torch_dist")


def save_checkpoint(queue, args):
    megatron_stream.save(queue, args, megatron_schema.CoreSchema(args.saver_transformer_impl), args.ckpt_format)
