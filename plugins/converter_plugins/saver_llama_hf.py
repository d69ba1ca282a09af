"""Saver for Hugging Face Llama, Mistral or Qwen2 folders (whichever the stream describes; a stream of
another family becomes the first of these that holds its tensors)."""

from converter_core import plugin
from converter_plugins import minicpm
from converter_plugins.families import LLAMA_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = LLAMA_FAMILIES


def add_arguments(parser):
    plugin.add_hf_saver_arguments(parser, "Llama/Mistral/Qwen2 Hugging Face saver")


def save_checkpoint(queue, args):
    plugin.save_hf(queue, args, FAMILIES, folds=minicpm.FOLDS)


def finish_share(args, pieces):
    """Finish a job split over ranks, once each rank wrote its own files (docs/plugins.md)."""
    plugin.finish_hf_share(args, pieces)
