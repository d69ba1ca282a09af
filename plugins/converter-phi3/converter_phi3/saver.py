"""Saver plugin: the converter's message stream -> a Phi-3 Hugging Face folder."""

from converter_core import plugin
from converter_phi3 import FAMILIES

MODEL_TYPES = ("GPT",)


def add_arguments(parser):
    plugin.add_hf_saver_arguments(parser, "Phi-3 Hugging Face saver")


def save_checkpoint(queue, args):
    plugin.save_hf(queue, args, FAMILIES)
