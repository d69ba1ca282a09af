"""converter_core: Megatron-LM <-> Hugging Face checkpoint conversion on the CPU, one layer at a time."""

__version__ = "0.1.0"
