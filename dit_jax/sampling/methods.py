"""The sampling methods: traced functions (model, settings, labels (n,), keys (n,)) -> samples (n, H, W, C), one
row of METHODS per sampler name (docs/ARCHITECTURE.md, "Where to add: a sampler"). Each only arranges the model
call; the mathematics is the library's:

- ddpm, ddim: GaussianDiffusion.p_sample_loop / ddim_sample_loop (dit_jax.diffusion.gaussian), the official
  sample.py's loops, with per-example keys (x_T and every step's noise of example i come from keys[i]).
- dpmsolver++: dit_jax.diffusion.dpm_solver.sample on the (guided) eps half, from the same x_T as ddpm / ddim.
- euler, heun, euler_maruyama: dit_jax.diffusion.flow.sample from x_0 = normal(keys[i]) (Euler-Maruyama's step
  noise from fold_in(keys[i], step)); the model reads t * time_scale.
- euler with a schedule: DDT's encoder sharing (MCG-NJU/DDT sharing_sampling.py): the condition encoder runs on
  the schedule's steps only and the velocity decoder reuses its last output on the others.

Guidance uses the one batch order of dit_jax.diffusion.guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.diffusion import dpm_solver, flow, guidance
from dit_jax.diffusion.sharing import recompute_mask
from dit_jax.sampling.settings import SampleSettings

Method = Callable[[nnx.Module, SampleSettings, jax.Array, jax.Array, float], jax.Array]


def sample_shape(model: nnx.Module, n: int) -> tuple[int, int, int, int]:
    """(n, H, W, C) of the model's input."""
    return (n, model.input_size, model.input_size, model.in_channels)


def guided_eps_fn(model: nnx.Module, cfg_scale: float, cfg_channels: int | None = 3) -> Callable[..., jax.Array]:
    """(x (n, H, W, C), t (n,), y (n,)) -> the model's output (n, H, W, out_channels) with the first cfg_channels
    eps channels guided (None: every input channel), the rest (the learned variance) from the conditional pass.
    Equals the first half of the official `forward_with_cfg([x | x], [t | t], [y | null])`."""
    n_guided = model.in_channels if cfg_channels is None else int(cfg_channels)
    if not 0 < n_guided <= model.out_channels:
        raise ValueError(f"cfg_channels must be in [1, {model.out_channels}], got {cfg_channels}")
    null = model.num_classes

    def fn(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cond, uncond = guidance.unpair(model(guidance.paired(x), guidance.paired(t), guidance.paired_labels(y, null)))
        eps = guidance.combine(cond[..., :n_guided], uncond[..., :n_guided], cfg_scale)
        return jnp.concatenate([eps, cond[..., n_guided:]], axis=-1)

    return fn


def diffusion_model_fn(model: nnx.Module, settings: SampleSettings) -> Callable[..., jax.Array]:
    if settings.cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    return guided_eps_fn(model, settings.cfg_scale, settings.cfg_channels)


def gaussian_sample(model: nnx.Module, settings: SampleSettings, labels: jax.Array, keys: jax.Array,
                    time_scale: float = 1.0) -> jax.Array:
    """ddpm / ddim: the respaced process's own loop; dpmsolver++: the solver over the 1000-step process (time_scale
    does not apply: the model reads the timestep)."""
    del time_scale
    diffusion = settings.diffusion()
    kw = dict(clip_denoised=settings.clip_denoised, model_kwargs=dict(y=labels), key=keys)
    shape = sample_shape(model, labels.shape[0])
    fn = diffusion_model_fn(model, settings)
    if settings.sampler == "dpmsolver++":
        x_T, _ = diffusion.loop_noise(shape, keys)  # the x_T ddpm / ddim start from
        eps = lambda x, t: fn(x, t, labels)[..., :model.in_channels]  # noqa: E731 (the learned-sigma half unused)
        return dpm_solver.sample(eps, x_T, diffusion.alphas_cumprod, settings.num_steps,
                                 clip_denoised=settings.clip_denoised)
    if settings.sampler == "ddim":
        return diffusion.ddim_sample_loop(fn, shape, eta=settings.eta, **kw)
    return diffusion.p_sample_loop(fn, shape, **kw)


def velocity_fn(model: nnx.Module, time_scale: float) -> Callable[..., jax.Array]:
    """(x, t in [0, 1], y) -> the velocity: a DDT's v output, or a DiT's first in_channels outputs."""
    def fn(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        out = model(x, t * time_scale, y)
        return out[0] if isinstance(out, tuple) else out[..., :model.in_channels]

    return fn


def initial_noise(model: nnx.Module, keys: jax.Array) -> jax.Array:
    """x at t = 0 of a flow sampler: example i's from normal(keys[i])."""
    tail = sample_shape(model, 0)[1:]
    return jax.vmap(lambda k: jax.random.normal(k, tail, jnp.float32))(keys)


def flow_sample(model: nnx.Module, settings: SampleSettings, labels: jax.Array, keys: jax.Array,
                time_scale: float = 1.0) -> jax.Array:
    """euler / heun / euler_maruyama (a schedule: DDT encoder sharing, see shared_euler)."""
    noise = initial_noise(model, keys)
    if settings.schedule is not None:
        return shared_euler(model, settings, labels, noise, time_scale)[0]
    fs = settings.flow()
    velocity = flow.guided_velocity(velocity_fn(model, time_scale), labels, model.num_classes, fs)
    return flow.sample(velocity, noise, fs, key=keys if settings.sampler == "euler_maruyama" else None)


def shared_euler(model: nnx.Module, settings: SampleSettings, labels: jax.Array, noise: jax.Array,
                 time_scale: float = 1.0, *, collect_states: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """DDT's Euler sampler with the condition encoder run on settings.schedule's steps only (all steps when None)
    -> (x at t = 1, every step's self-condition s (num_steps, 2n or n, tokens, width) with collect_states).
    One lax.scan: the encoder sits in a lax.cond, so a shared step costs one decoder pass."""
    if not getattr(model, "num_encoder_blocks", 0):
        raise ValueError("encoder sharing needs a DDT with a condition encoder (num_encoder_blocks > 0)")
    fs = settings.flow()
    n = fs.num_steps
    times = fs.times()
    mask = recompute_mask(list(range(n)) if settings.schedule is None else list(settings.schedule), n)
    guided = fs.cfg_scale != 1.0
    y = guidance.paired_labels(labels, model.num_classes) if guided else labels.astype(jnp.int32)
    both = guidance.paired if guided else (lambda a: a)
    b = noise.shape[0]

    def encode(x: jax.Array, t: jax.Array) -> jax.Array:
        return model.encode(both(x), both(jnp.full((b,), t, jnp.float32)) * time_scale, y)

    def step(carry: tuple[jax.Array, jax.Array], inp: tuple) -> tuple[tuple[jax.Array, jax.Array], Any]:
        x, s = carry
        t_cur, t_next, refresh = inp
        s = jax.lax.cond(refresh, lambda: encode(x, t_cur), lambda: s)
        out = model.decode(both(x), s)
        scale = flow.guidance_scale(t_cur, fs.cfg_scale, fs.interval_min, fs.interval_max)
        v = flow.guide(out, scale) if guided else out
        return (x + v * (t_next - t_cur), s), (s if collect_states else None)

    s0 = encode(noise, jnp.float32(times[0]))  # step 0 always encodes (recompute_mask requires it)
    xs = (jnp.asarray(times[:-1]), jnp.asarray(times[1:]), jnp.asarray(_after_first(mask)))
    (x, _), states = jax.lax.scan(step, (noise, s0), xs)
    return x, states


def _after_first(mask: Any) -> np.ndarray:
    """The recompute mask with step 0 off (its encoder output is the scan's initial carry)."""
    m = np.array(mask, dtype=bool)
    m[0] = False
    return m


METHODS: dict[str, Method] = {
    "ddpm": gaussian_sample,
    "ddim": gaussian_sample,
    "dpmsolver++": gaussian_sample,
    "euler": flow_sample,
    "heun": flow_sample,
    "euler_maruyama": flow_sample,
}
