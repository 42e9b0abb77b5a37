"""Sampling a DDT with encoder sharing (MCG-NJU/DDT stateful_flow_matching/sharing_sampling.py).

    sampler = DDTSampler(model, FlowSampleSettings(num_steps=250, cfg_scale=2.0, interval_min=0.3, last_step=0.04),
                         schedule=dp_schedule(sim, 250 // 4))
    x = sampler(labels, noise)                       # (B, H, W, C) latents at t = 1

The condition encoder and the velocity decoder are two separately compiled functions; the Python loop over the
Euler steps calls the encoder only on the schedule's recompute steps and otherwise feeds the decoder the last
self-condition s, so a shared step costs one decoder pass. The schedule is a sorted list of step indices starting
at 0 (dit_jax.diffusion.sharing: uniform_schedule, dp_schedule); None recomputes every step, which is the plain
sampler. With guidance both run on the [uncond | cond] batch (s then holds both halves), as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.diffusion import flow
from dit_jax.diffusion.sharing import recompute_mask
from dit_jax.models.ddt import DDT, DDT_models


class DDTSampler:
    """Euler ODE sampling of a DDT, the encoder shared across steps by `schedule` (see the module docstring)."""

    def __init__(self, model: DDT, settings: flow.FlowSampleSettings, schedule: Sequence[int] | None = None):
        if settings.sampler != "euler":
            raise ValueError(f"encoder sharing runs the Euler ODE sampler; got sampler={settings.sampler!r}")
        if not model.num_encoder_blocks:
            raise ValueError("encoder sharing needs a DDT with a condition encoder (num_encoder_blocks > 0)")
        n = settings.num_steps
        self.settings = settings
        self.schedule = list(range(n)) if schedule is None else [int(i) for i in schedule]
        self.mask = recompute_mask(self.schedule, n)  # validates the schedule
        self.times = settings.times()
        self.null_class = model.num_classes
        self.guided = settings.cfg_scale != 1.0
        self.encoder_calls = 0
        graphdef, state = nnx.split(model)
        self.state = state

        def double(a: jax.Array) -> jax.Array:
            return jnp.concatenate([a, a]) if self.guided else a

        def encode(state: Any, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode(double(x), double(t), y)

        def decode_step(state: Any, x: jax.Array, s: jax.Array, dt: jax.Array, scale: jax.Array) -> jax.Array:
            out = nnx.merge(graphdef, state).decode(double(x), s)
            v = flow.guide(out, scale) if self.guided else out
            return x + v * dt

        self._encode = jax.jit(encode)
        self._decode_step = jax.jit(decode_step)

    def labels_for_model(self, labels: jax.Array) -> jax.Array:
        """[uncond | cond] labels when guided (the reference's cfg batch order), else the labels."""
        if not self.guided:
            return labels
        return jnp.concatenate([jnp.full_like(labels, self.null_class), labels])

    def __call__(self, labels: Any, noise: jax.Array, *, collect_states: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[np.ndarray]]:
        """labels (B,) ints, noise (B, H, W, C) -> samples; collect_states also returns each step's s (numpy)."""
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (noise.shape[0],):
            raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
        y = self.labels_for_model(labels)
        b = noise.shape[0]
        s = self.settings
        x, state, states = noise, None, []
        for i in range(s.num_steps):
            t_cur = np.float32(self.times[i])
            if self.mask[i]:
                state = self._encode(self.state, x, jnp.full((b,), t_cur, jnp.float32), y)
                self.encoder_calls += 1
            inside = np.float32(s.interval_min) < t_cur < np.float32(s.interval_max)  # in float32, as torch compares
            scale = np.float32(s.cfg_scale if inside else 1.0)
            x = self._decode_step(self.state, x, state, np.float32(self.times[i + 1] - t_cur), scale)
            if collect_states:
                states.append(np.asarray(state))
        return (x, states) if collect_states else x


class KeyedDDTSampler:
    """`dit-jax sample-fid`'s sampler interface over a DDTSampler, batch-sharded over `mesh`:

        latents = KeyedDDTSampler(DDTSampler(model, settings), mesh)(labels, example_keys(seed, indices))

    Example i starts from normal(keys[i], (H, W, C)), so a sample depends on its key and label only, not on the
    batch size, the device count or where an interrupted run resumed. A batch is padded up to a multiple of the
    device count (padding examples repeat example 0 and are dropped)."""

    def __init__(self, sampler: DDTSampler, model: DDT, mesh: Mesh):
        self.sampler, self.mesh = sampler, mesh
        self.num_classes = model.num_classes
        self.batch_sharding = NamedSharding(mesh, P("data"))
        sampler.state = jax.device_put(sampler.state, NamedSharding(mesh, P()))
        shape = (model.input_size, model.input_size, model.in_channels)
        self._noise = jax.jit(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32)),
                              out_shardings=self.batch_sharding)

    def __call__(self, labels: Any, keys: jax.Array) -> jax.Array:
        """labels (n,) ints in [0, num_classes), keys (n,) -> latents (n, H, W, C) float32 at t = 1."""
        labels = np.asarray(labels)
        n = labels.shape[0]
        if labels.ndim != 1 or keys.shape[0] != n:
            raise ValueError(f"labels must be 1-D with one key each; got labels {labels.shape}, keys {keys.shape}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got min {labels.min()}, max {labels.max()}")
        pad = (-n) % self.mesh.size
        if pad:
            labels = np.concatenate([labels, np.repeat(labels[:1], pad)])
            keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)])
        noise = self._noise(jax.device_put(keys, self.batch_sharding))
        return self.sampler(jax.device_put(labels.astype(np.int32), self.batch_sharding), noise)[:n]


def load_ddt(variant: str, image_size: int, ckpt: str | None = None, *, which: str = "ema",
             random_init: bool = False, seed: int = 0) -> DDT:
    """A DDT for `image_size` px (latents image_size // 8): from a checkpoint (.ckpt/.pt or .safetensors, the
    released layout; built abstractly, so nothing is initialised twice) or, with random_init, untrained."""
    if variant not in DDT_models:
        raise ValueError(f"unknown DDT variant {variant!r}; expected one of {sorted(DDT_models)}")
    make = DDT_models[variant]
    if random_init:
        return make(input_size=image_size // 8, rngs=nnx.Rngs(seed))
    if not ckpt:
        raise ValueError("give a DDT checkpoint (--ckpt / --checkpoint: .ckpt/.pt or .safetensors) or --random-init")
    from dit_jax.convert.ddt import load_official_ddt
    from dit_jax.convert.pt_reader import read_state_dict

    abstract = nnx.eval_shape(lambda: make(input_size=image_size // 8, rngs=nnx.Rngs(0)))
    return load_official_ddt(abstract, read_state_dict(ckpt), which=which)
