"""Megatron checkpoints (Megatron-Core or legacy GPT) <-> message stream: the model description (args),
the table of layer message keys (keys), where each key lives in a checkpoint (schema), the saver (save)
writing through one sink per format (sinks), and the loaders of per-rank (load) and torch_dist
(load_dist) checkpoints. Nothing is imported here, so a module can take just what it needs."""
