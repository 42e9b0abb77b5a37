"""dit-jax: DiT and DDT in JAX/Flax NNX, paper-exact, from a laptop CPU to a TPU pod."""

__version__ = "0.1.0"
