"""Saver for Hugging Face MiniCPM folders that MiniCPM's remote code loads (scalars always explicit)."""

from converter_core import plugin
from converter_plugins.families import MINICPM_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = MINICPM_FAMILIES


def add_arguments(parser):
    plugin.add_hf_saver_arguments(parser, "MiniCPM Hugging Face saver")


def save_checkpoint(queue, args):
    plugin.save_hf(queue, args, FAMILIES)


def finish_share(args, pieces):
    """Finish a job split over ranks, once each rank wrote its own files (docs/plugins.md)."""
    plugin.finish_hf_share(args, pieces)
