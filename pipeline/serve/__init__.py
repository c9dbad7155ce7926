"""Using a bundle: evaluate and score (on the driver), predict (in the executors), inspect."""
