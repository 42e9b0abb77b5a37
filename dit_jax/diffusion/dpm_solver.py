"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): the multistep second-order solver of the data-prediction ODE, for a model trained with Gaussian diffusion
that predicts epsilon (DiT's first in_channels outputs; the learned-sigma half is not used).

The step rule, the time grid and the order schedule are those of diffusers' `DPMSolverMultistepScheduler` with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", timestep_spacing="linspace",
final_sigmas_type="zero" (its defaults, which diffusers' DiT documentation samples with in 25 steps):

    timesteps t_0 > ... > t_{n-1}: round(linspace(0, T - 1, n + 1))[::-1][:-1]    (integers of the T-step process)
    sigma_i = sqrt((1 - abar_{t_i}) / abar_{t_i}), sigma_n = 0;  alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha,
    lambda = log(alpha) - log(s), h = lambda_{i+1} - lambda_i
    x0_i = (x - s_i eps(x, t_i)) / alpha_i                              (the data prediction)
    first order (step 0, and the last step):  x <- (s_{i+1} / s_i) x - alpha_{i+1} (e^{-h} - 1) x0_i
    second order (the others), r = h_{i-1} / h, D1 = (x0_i - x0_{i-1}) / r:
                                     x <- (s_{i+1} / s_i) x - alpha_{i+1} (e^{-h} - 1) (x0_i + D1 / 2)
The last step (sigma = 0) returns x0 of the last model call. One model call per step; a lax.scan, so jittable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def solver_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """(num_steps,) int64: diffusers' "linspace" spacing, from t = T - 1 down."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    grid = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return grid.copy().astype(np.int64)


def solver_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """(n + 1,) float32: sigma = sqrt((1 - abar) / abar) at each timestep, then 0."""
    ab = np.asarray(alphas_cumprod, np.float32)  # diffusers keeps its tables in float32
    sigmas = ((1 - ab) / ab) ** 0.5
    return np.concatenate([sigmas[timesteps], [0.0]]).astype(np.float32)


def sample(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    alphas_cumprod: np.ndarray,
    num_steps: int,
    *,
    clip_denoised: bool = False,
    return_all: bool = False,
) -> jax.Array:
    """Integrate from x_T (B, ...) at t = T - 1 to x_0. eps_fn(x, t (B,) int32) -> epsilon (B, ...), already guided.
    clip_denoised clips each data prediction to [-1, 1] (pixel-space models, as p_sample's clip_denoised).
    return_all: every step's x (num_steps, B, ...) instead of the last."""
    ts = solver_timesteps(num_steps, len(alphas_cumprod))
    sig = solver_sigmas(alphas_cumprod, ts)
    # the step's coefficients in float32, in the reference's order of operations (diffusers computes them in
    # float32 torch): the first step's x0 is ~1/alpha = 150x x, so float32 rounding there is visible in the result
    one = np.float32(1.0)
    alpha = one / np.sqrt(sig * sig + one)
    s = sig * alpha
    with np.errstate(divide="ignore"):  # the final sigma is 0: lambda = inf there, e^{-h} = 0
        lam = np.log(alpha) - np.log(s)
    n = len(ts)
    h = lam[1:] - lam[:-1]  # (n,) float32, the last one inf
    h_prev = np.concatenate([[np.float32(1.0)], h[:-1]]).astype(np.float32)  # h_{i-1} (unused at step 0)
    first = np.zeros(n, bool)
    first[0] = first[-1] = True  # diffusers: order 1 to start (no history) and at the final sigma 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(s[:-1] > 0, s[1:] / s[:-1], np.float32(0.0)).astype(np.float32)
        r = np.where(np.isfinite(h), h_prev / h, one).astype(np.float32)
    coef = (alpha[1:] * (np.exp(-h) - one)).astype(np.float32)
    xs = dict(t=jnp.asarray(ts, jnp.int32), a_s=jnp.asarray(alpha[:-1]), s_s=jnp.asarray(s[:-1]),
              ratio=jnp.asarray(ratio), coef=jnp.asarray(coef), inv_r=jnp.asarray(one / r), first=jnp.asarray(first))
    b = x_T.shape[0]

    def step(carry: tuple[jax.Array, jax.Array], c: dict) -> tuple[tuple[jax.Array, jax.Array], jax.Array | None]:
        x, x0_prev = carry
        eps = eps_fn(x, jnp.full((b,), c["t"], jnp.int32)).astype(jnp.float32)
        x0 = (x - c["s_s"] * eps) / c["a_s"]
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        first_order = c["ratio"] * x - c["coef"] * x0
        d1 = c["inv_r"] * (x0 - x0_prev)
        second_order = c["ratio"] * x - c["coef"] * x0 - 0.5 * c["coef"] * d1
        x = jnp.where(c["first"], first_order, second_order)
        return (x, x0), (x if return_all else None)

    x = jnp.asarray(x_T, jnp.float32)
    (x, _), every = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return every if return_all else x
