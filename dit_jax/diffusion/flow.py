"""Flow matching on the linear path, as DDT trains and samples it (MCG-NJU/DDT src/diffusion/*flow_matching*).

Convention (MCG-NJU/DDT's flow matching): t = 0 is pure noise and t = 1 is data,
    x_t = t * x + (1 - t) * eps,        target velocity v = dx_t/dt = x - eps,
trained with the element-mean squared error, t drawn logit-normal (sigmoid of N(0, 1)) or uniform. The same loss
trains a DiT-shaped velocity model (SiT-style) when its output is read as v.

Sampling integrates dx/dt = v(x, t) from noise at t = 0 to t = 1 on the reference's grid
    linspace(0, 1 - last_step, num_steps) ++ [1.0], then time-shifted t' = t / (t + (1 - t) * shift),
with Euler (ODE), Heun (the reference's form: x <- x + (v + v') dt / 2 with v' at the Euler prediction, and
v' reused as the next step's predictor velocity, so N steps cost N model calls), or
Euler-Maruyama in the variance-preserving form
    x <- x + v dt + 0.5 * w * score * dt + sqrt(w dt) * N(0, I),   score = (t v - x) / (1 - t),  w = 1 - t,
with a plain Euler last step. Classifier-free guidance runs the model on each example's conditional and
unconditional pass (dit_jax.diffusion.guidance's batch order) and applies scale s only where
interval_min < t < interval_max (scale 1 elsewhere), on every channel.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import guidance
from dit_jax.diffusion.utils import is_key_batch

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, ...), t (B,)) -> v (B, ...)
T_DISTS = ("logit_normal", "uniform")
SAMPLERS = ("euler", "heun", "euler_maruyama")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = t x + (1 - t) eps; t (B,)."""
    tb = _bcast(t, x)
    return tb * x + (1.0 - tb) * noise


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
    return x - noise


def sample_t(key: jax.Array, n: int, dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """(n,) training times: sigmoid(N(mean, std)) (DDT's lognorm_t) or U[0, 1)."""
    if dist == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))
    if dist == "uniform":
        return jax.random.uniform(key, (n,), jnp.float32)
    raise ValueError(f"unknown t distribution {dist!r}; expected one of {T_DISTS}")


def training_losses(
    velocity_fn: VelocityFn, x: jax.Array, t: jax.Array, noise: jax.Array | None = None, key: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-example flow-matching loss mean((v_pred - (x - eps))^2) over all non-batch axes -> {"loss": (B,)}."""
    if noise is None:
        if key is None:
            raise ValueError("training_losses needs noise or a key")
        noise = jax.random.normal(key, x.shape, x.dtype)
    v = velocity_fn(interpolate(x, noise, t), t)
    err = jnp.square(v.astype(jnp.float32) - velocity_target(x, noise).astype(jnp.float32))
    return {"loss": jnp.mean(err, axis=tuple(range(1, x.ndim)))}


def timeshift(t: jax.Array | np.ndarray, shift: float) -> jax.Array | np.ndarray:
    """t' = t / (t + (1 - t) shift): shift > 1 spends more steps near the noise end (t small)."""
    return t / (t + (1 - t) * shift)


def sample_times(num_steps: int, last_step: float | None = None, shift: float = 1.0) -> np.ndarray:
    """(num_steps + 1,) float32 grid: linspace(0, 1 - last_step, num_steps) ++ [1], time-shifted. last_step None
    means 1 / num_steps (a uniform grid); DDT's headline sampler uses 250 steps with last_step 0.04."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    if not 0.0 < last_step <= 1.0:
        raise ValueError(f"last_step must be in (0, 1], got {last_step}")
    grid = np.concatenate([np.linspace(0.0, 1.0 - last_step, num_steps, dtype=np.float32), np.ones(1, np.float32)])
    return timeshift(grid, np.float32(shift)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FlowSampleSettings:
    """How to sample a flow model. cfg_scale 1.0 turns guidance off (one model call per step)."""

    num_steps: int = 250
    sampler: str = "euler"
    cfg_scale: float = 1.0
    interval_min: float = 0.0  # guidance only where interval_min < t < interval_max (DDT: 0.3, 1.0)
    interval_max: float = 1.0
    shift: float = 1.0
    last_step: float | None = None  # DDT: 0.04

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if self.cfg_scale < 0 or self.shift <= 0:
            raise ValueError(f"cfg_scale must be >= 0 and shift > 0, got {self.cfg_scale}, {self.shift}")

    def times(self) -> np.ndarray:
        return sample_times(self.num_steps, self.last_step, self.shift)


def guidance_scale(t: jax.Array, scale: float, lo: float, hi: float) -> jax.Array:
    """scale inside the open interval (lo, hi), 1 outside (DDT's guidance interval)."""
    return jnp.where((t > lo) & (t < hi), jnp.float32(scale), jnp.float32(1.0))


def guide(out: jax.Array, scale: jax.Array) -> jax.Array:
    """out (2B, ...) of a paired batch (dit_jax.diffusion.guidance) -> uncond + scale (cond - uncond) (B, ...),
    every channel."""
    cond, uncond = guidance.unpair(out)
    return guidance.combine(cond, uncond, scale)


def score_from_velocity(x: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """The linear path's score from the velocity: (t v - x) / (1 - t) (reference's s with alpha = t, sigma = 1 - t)."""
    tb = _bcast(t, x)
    return (tb * v - x) / (1.0 - tb)


def sample(
    velocity_fn: VelocityFn, noise: jax.Array, settings: FlowSampleSettings, key: jax.Array | None = None
) -> jax.Array:
    """Integrate from noise (t = 0) to data (t = 1). velocity_fn(x, t (B,)) returns the (already guided) velocity.
    key: needed by euler_maruyama only: one key (step i draws the batch's noise from fold_in(key, i)) or one key per
    example (B,) (example b's step-i noise from fold_in(key[b], i), so a sample does not depend on its batch).
    One lax.scan over the steps, so the compiled size does not grow with num_steps; call it under jax.jit."""
    if settings.sampler == "euler_maruyama" and key is None:
        raise ValueError("the euler_maruyama sampler needs a key")
    times = settings.times()
    n = settings.num_steps
    b = noise.shape[0]
    xs = (jnp.arange(n), jnp.asarray(times[:-1]), jnp.asarray(times[1:]))

    def step(carry: tuple[jax.Array, jax.Array], inp: tuple) -> tuple[tuple[jax.Array, jax.Array], None]:
        x, v_prev = carry
        i, t_cur, t_next = inp
        dt = t_next - t_cur
        tc = jnp.full((b,), t_cur, jnp.float32)
        last = i == n - 1
        if settings.sampler == "heun":
            # the reference reuses the corrector's velocity as the next predictor (one model call per step)
            v = jax.lax.cond(i == 0, lambda: velocity_fn(x, tc), lambda: v_prev)
            v_hat = velocity_fn(x + v * dt, jnp.full((b,), t_next, jnp.float32))
            x_new = jnp.where(last, x + v * dt, x + 0.5 * (v + v_hat) * dt)
            return (x_new, v_hat), None
        v = velocity_fn(x, tc)
        if settings.sampler == "euler_maruyama":
            w = 1.0 - t_cur
            if is_key_batch(key):
                eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(key)
            else:
                eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            sde = x + v * dt + 0.5 * w * score_from_velocity(x, v, tc) * dt + jnp.sqrt(w * dt) * eps
            return (jnp.where(last, x + v * dt, sde), v_prev), None  # the last step is plain Euler
        return (x + v * dt, v_prev), None

    (x, _), _ = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), xs)
    return x


def guided_velocity(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], labels: jax.Array,
                    null_class: int, settings: FlowSampleSettings) -> VelocityFn:
    """(x, t) -> guided v, calling model_fn(x2, t2, y2) once on the paired batch (dit_jax.diffusion.guidance)."""
    if settings.cfg_scale == 1.0:
        return lambda x, t: model_fn(x, t, labels)
    y2 = guidance.paired_labels(labels, null_class)

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(guidance.paired(x), guidance.paired(t), y2)
        return guide(out, guidance_scale(t[0], settings.cfg_scale, settings.interval_min, settings.interval_max))

    return fn
