"""Sampling a DDT with encoder sharing (MCG-NJU/DDT stateful_flow_matching/sharing_sampling.py).

    sampler = DDTSampler(model, FlowSampleSettings(num_steps=250, cfg_scale=2.0, interval_min=0.3, last_step=0.04),
                         schedule=dp_schedule(sim, 250 // 4))
    x = sampler(labels, noise)                       # (B, H, W, C) latents at t = 1

The condition encoder and the velocity decoder are two separately compiled functions; the Python loop over the
Euler steps calls the encoder only on the schedule's recompute steps and otherwise feeds the decoder the last
self-condition s, so a shared step costs one decoder pass. The schedule is a sorted list of step indices starting
at 0 (dit_jax.diffusion.sharing: uniform_schedule, dp_schedule); None recomputes every step, which is the plain
sampler. With guidance both run on the [uncond | cond] batch (s then holds both halves), as in the reference.

Velocity models without a condition encoder (a DiT trained with objective=flow, SiT-style, or the single-stream
"improved DiT") sample through PlainFlowSampler, the same call with one compiled solver loop:

    sampler = PlainFlowSampler(model, settings, time_scale=1000.0)   # a DiT reads t in [0, 1000)
"""

from __future__ import annotations

import functools
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
from dit_jax.errors import CheckpointMismatchError
from dit_jax.models.ddt import DDT, DDT_models
from dit_jax.sample import pad_to_multiple
from dit_jax.sample_cli import LoadedModel, load_model

DEFAULT_VARIANT = "DDT-XL/2"  # the released checkpoint's (MCG-NJU/DDT: DDT-XL-22en6de-R256)


class DDTSampler:
    """Euler ODE sampling of a DDT, the encoder shared across steps by `schedule` (see the module docstring)."""

    def __init__(self, model: DDT, settings: flow.FlowSampleSettings, schedule: Sequence[int] | None = None,
                 time_scale: float = 1.0):
        """time_scale: t in [0, 1] is multiplied by it for the model (a training run's flow.time_scale)."""
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
            return nnx.merge(graphdef, state).encode(double(x), double(t) * time_scale, y)

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


@functools.lru_cache(maxsize=4)
def flow_sampler(graphdef: nnx.GraphDef, settings: flow.FlowSampleSettings, time_scale: float, channels: int,
                 num_classes: int) -> Any:
    """jit((state, noise (N, H, W, C), labels (N,)) -> samples (N, H, W, C)): the whole solver of
    dit_jax.diffusion.flow (Euler, Heun or Euler-Maruyama; CFG [uncond | cond] within the guidance interval) over a
    velocity model: a DDT (its v output) or a DiT (the first `channels` outputs), called with t * time_scale.
    Cached on its arguments, so the trainer's periodic sample grids compile once."""

    def run(state: Any, noise: jax.Array, labels: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, *(state if isinstance(state, tuple) else (state,)))

        def model_fn(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
            out = model(x, t * time_scale, y)
            return out[0] if isinstance(out, tuple) else out[..., :channels]

        velocity = flow.guided_velocity(model_fn, labels, num_classes, settings)
        return flow.sample(velocity, noise, settings)

    return jax.jit(run)


class PlainFlowSampler:
    """DDTSampler's interface (sampler(labels, noise), .state, .schedule, .encoder_calls) for any velocity model,
    without encoder sharing: flow_sampler's compiled loop. A DDT with an encoder runs it every step (encoder_calls
    counts those runs); a DiT or single-stream model has none (encoder_calls stays 0)."""

    def __init__(self, model: nnx.Module, settings: flow.FlowSampleSettings, time_scale: float = 1.0):
        graphdef, self.state = nnx.split(model)
        self.settings = settings
        self.schedule = list(range(settings.num_steps))
        self._counts_encoder = bool(getattr(model, "num_encoder_blocks", 0))
        self.encoder_calls = 0
        self._run = flow_sampler(graphdef, settings, float(time_scale), model.in_channels, model.num_classes)

    def __call__(self, labels: Any, noise: jax.Array) -> jax.Array:
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (noise.shape[0],):
            raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
        if self._counts_encoder:
            self.encoder_calls += self.settings.num_steps
        return self._run(self.state, noise, labels)


class KeyedDDTSampler:
    """`dit-jax sample-fid`'s sampler interface over a DDTSampler, batch-sharded over `mesh`:

        latents = KeyedDDTSampler(DDTSampler(model, settings), mesh)(labels, example_keys(seed, indices))

    Example i starts from normal(keys[i], (H, W, C)), so a sample depends on its key and label only, not on the
    batch size, the device count or where an interrupted run resumed. A batch is padded up to a multiple of the
    device count (padding examples repeat example 0 and are dropped)."""

    def __init__(self, sampler: DDTSampler | PlainFlowSampler, model: nnx.Module, mesh: Mesh):
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
        labels, keys = pad_to_multiple(self.mesh.size, labels, keys)
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
    try:
        return load_official_ddt(abstract, read_state_dict(ckpt), which=which)
    except CheckpointMismatchError as e:  # hundreds of keys: the summary, in one line
        raise ValueError(f"{ckpt} does not fit {variant} (is it a {variant} checkpoint?): {e.summary()}") from e


def load_flow_model(ckpt: str | None, *, variant: str = DEFAULT_VARIANT, image_size: int | None = None,
                    which: str = "ema", random_init: bool = False, seed: int = 0) -> LoadedModel:
    """What `sample-ddt` and `ddt-schedule` sample: a dit-jax training run trained with objective=flow (a DDT, or a
    SiT-style DiT; its EMA weights with which="ema", its size, VAE and flow.time_scale from the run's config), a
    DDT checkpoint in the released layout, or (random_init) an untrained `variant`.
    image_size defaults to the run's, else 256."""
    from dit_jax.train.export import is_training_run

    if ckpt and not random_init and is_training_run(ckpt):
        loaded = load_model(ckpt, objective="flow", use_ema=which == "ema")
        if image_size is not None and image_size != loaded.image_size:
            raise ValueError(f"{ckpt} was trained for {loaded.image_size} px images, not {image_size}: drop the "
                             "image size option")
        return loaded
    size = 256 if image_size is None else image_size
    model = load_ddt(variant, size, ckpt, which=which, random_init=random_init, seed=seed)
    return LoadedModel(model, variant.replace("/", "-"), False, size, clip_denoised=False)


def make_flow_sampler(model: nnx.Module, settings: flow.FlowSampleSettings, schedule: Sequence[int] | None = None,
                      time_scale: float = 1.0) -> DDTSampler | PlainFlowSampler:
    """A DDT with a condition encoder -> DDTSampler (encoder sharing by `schedule`); any other velocity model ->
    PlainFlowSampler (a schedule is an error: there is no encoder to share)."""
    if getattr(model, "num_encoder_blocks", 0):
        return DDTSampler(model, settings, schedule=schedule, time_scale=time_scale)
    if schedule is not None:
        raise ValueError("encoder sharing (a schedule or refresh rate) needs a DDT with a condition encoder; "
                         f"this {type(model).__name__} has none")
    return PlainFlowSampler(model, settings, time_scale=time_scale)
