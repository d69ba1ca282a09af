"""Loader for any Hugging Face family converter_core ships; the family comes from config.json
(model_type, else architectures)."""

from converter_core import plugin
from converter_plugins.families import MODEL_SIZES, ALL_FAMILIES

MODEL_TYPES = ("GPT",)  # convert.py's --model-type values this plugin converts
FAMILIES = ALL_FAMILIES


def add_arguments(parser):
    plugin.add_hf_loader_arguments(parser, "Hugging Face loader (every built-in family)", MODEL_SIZES)


def load_checkpoint(queue, args):
    plugin.load_hf(queue, args, FAMILIES)
