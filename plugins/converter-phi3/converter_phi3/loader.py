"""Loader plugin: a Phi-3 Hugging Face folder -> the converter's message stream."""

from converter_core import plugin
from converter_phi3 import FAMILIES

MODEL_TYPES = ("GPT",)


def add_arguments(parser):
    plugin.add_hf_loader_arguments(parser, "Phi-3 Hugging Face loader")


def load_checkpoint(queue, args):
    plugin.load_hf(queue, args, FAMILIES)
