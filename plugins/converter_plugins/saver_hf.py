"""Saver for any Hugging Face family converter_core ships: the stream's own family (from the config.json
it was made from), else the one its Megatron args describe, or --hf-model-type."""

from converter_core import plugin
from converter_plugins.families import ALL_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = ALL_FAMILIES


def add_arguments(parser):
    plugin.add_hf_saver_arguments(parser, "Hugging Face saver (every built-in family)")


def save_checkpoint(queue, args):
    plugin.save_hf(queue, args, FAMILIES)


def finish_share(args, pieces):
    """Finish a job split over ranks, once each rank wrote its own files (docs/plugins.md)."""
    plugin.finish_hf_share(args, pieces)
