"""Model FLOPs, MFU and benchmarking, in one package (docs/ARCHITECTURE.md, "Layers").

- `flops`: analytic parameter and MAC counts of DiT (the paper's convention), a MAC count traced from any jaxpr,
  and `forward_macs(config.model)` for every model family (layer 1: numerics);
- `mfu`: the peak FLOP/s of a device and model FLOPs utilisation (layer 1; no jax);
- `bench`: the throughput of the trainer's step and of the guided sampling forward (layer 3: it runs the train
  step);
- `cli`: the `dit-jax bench` and `dit-jax flops` commands (layer 4).

Importing the package imports none of them.
"""
