"""Built-in converter_core plugins, one module per role and format, in Megatron's loader_X / saver_X shape."""

import importlib

# The message keys a built-in family registers (gpt-oss's attention sinks and expert biases, Qwen3-Next's
# DeltaNet tensors) are known to every built-in plugin, the Megatron loaders and savers too: such a checkpoint
# also converts mcore -> mcore.
for _family in ("gpt_oss", "qwen3_next"):
    importlib.import_module(f"converter_plugins.{_family}")
