"""Training, Spark-free: the engine every mode shares, the modes, the barrier loop, checkpoints, models, bundle, preflight."""
