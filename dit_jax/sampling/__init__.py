"""Sampling (docs/ARCHITECTURE.md): one contract, sampler(labels, per-example keys) -> samples, over every method.

    from dit_jax.sampling import SampleSettings, Sampler, example_keys
    x = Sampler(model, SampleSettings(sampler="ddim", num_steps=50))(labels, example_keys(0, range(len(labels))))

settings.py (SampleSettings), methods.py (the METHODS table: ddpm, ddim, dpmsolver++, euler, heun, euler_maruyama, DDT encoder
sharing), sampler.py (Sampler: sharding, padding, the compiled-sampler cache), load.py (any checkpoint -> the model,
its objective, space and time scale), decode.py (samples -> uint8), fid.py (sample-fid's shards and .npz),
schedule.py (DDT's DP sharing schedule), cli.py (the commands).
"""

from dit_jax.sampling.methods import METHODS
from dit_jax.sampling.sampler import Sampler, data_mesh, example_keys, pad_to_multiple, sample_latents, sampler_for
from dit_jax.sampling.settings import OFFICIAL_LABELS, SampleSettings

__all__ = ["METHODS", "OFFICIAL_LABELS", "SampleSettings", "Sampler", "data_mesh", "example_keys", "pad_to_multiple",
           "sample_latents", "sampler_for"]
