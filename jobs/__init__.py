"""spark-submit entry points and the ``spark-train`` CLI (thin: parse, build config, call the library)."""
