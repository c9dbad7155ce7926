"""Spark side of training: barrier jobs, the two launchers a mode can name, fit, the TorchDistributor drop-in."""
