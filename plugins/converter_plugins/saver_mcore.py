"""Saver for Megatron-Core checkpoints (per-rank torch files or torch_dist), convert.py's core/mcore saver."""

from converter_core import plugin

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
MEGATRON_FORMATS = ("torch", "torch_dist")  # written
FORMAT_FLAGS = {"torch_dist": "--ckpt-format torch_dist"}  # how a command line picks each


def add_arguments(parser):
    plugin.add_megatron_saver_arguments(parser, "Megatron-Core saver")
    parser.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                        help="per-rank torch files (default, as convert.py) or torch_dist")


def save_checkpoint(queue, args):
    plugin.save_megatron(queue, args, args.ckpt_format)


def finish_share(args, pieces):
    """Finish a job split over ranks, once each rank wrote its own files (docs/plugins.md)."""
    plugin.finish_megatron_share(args, pieces)
