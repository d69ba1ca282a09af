"""On-disk formats: each module only reads and writes bytes; no model knowledge."""
