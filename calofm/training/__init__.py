"""Training: typed configs, data for a run, the Accelerate loop, pretraining entry point."""
