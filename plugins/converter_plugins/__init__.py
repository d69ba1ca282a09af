"""Built-in converter_core plugins, one module per role and format, in Megatron's loader_X / saver_X shape."""
