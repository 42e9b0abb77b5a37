"""Training: sharding, functional NNX step, EMA optimizer, Orbax checkpoints, metrics, the loop."""
