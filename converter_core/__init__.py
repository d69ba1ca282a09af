"""converter_core: Megatron-LM <-> Hugging Face checkpoint conversion on the CPU, one layer at a time.

    import converter_core
    result = converter_core.convert("llama_hf", "mcore", "./hf", "./mcore", target_tensor_parallel_size=2)
    converter_core.convert("hf", "mcore", "./big", "./big-mcore", processes=8)  # 8 ranks, the same output
    converter_core.detect("./mcore")      # format, family, TP/PP/EP/VP, dtype, sizes, parameters, plugins
    converter_core.detect("org/name")     # a Hugging Face Hub id (or org/name@revision), from its cache
    converter_core.supported()            # the support matrix, from the installed plugins
    converter_core.options("llama_hf", "mcore")   # the keywords convert() takes for that pair, typed
    converter_core.verify("./hf", "./mcore").identical   # the same tensors, whatever the formats
"""

__version__ = "0.1.0"
__all__ = ["convert", "detect", "supported", "options", "verify", "Result", "Detected", "Verified", "ConversionError"]


def __getattr__(name):
    """The API is imported on first use, so plugins importing converter_core.x stay light."""
    if name == "ConversionError":
        from converter_core.errors import ConversionError
        return ConversionError
    if name == "options":  # the module, which answers options(loader, saver)
        import converter_core.options
        return converter_core.options
    if name in ("verify", "Verified"):
        from converter_core import verification
        return getattr(verification, name)
    if name in __all__:
        from converter_core import api
        return getattr(api, name)
    raise AttributeError(f"module 'converter_core' has no attribute {name!r}")
