"""Flow matching (dit_jax/diffusion/flow.py): the loss at init, the samplers against closed forms, the time grid,
guidance with an interval."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.models import DDT


def test_loss_at_init_is_mean_squared_x_minus_eps():
    """The DDT's final layer is zero at init, so v = 0 and the loss is mean((x - eps)^2) per example."""
    model = DDT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_encoder_blocks=1, num_classes=10,
                rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((4, 8, 8, 4)), jnp.float32)
    eps = jnp.asarray(r.standard_normal((4, 8, 8, 4)), jnp.float32)
    t = flow.sample_t(jax.random.key(0), 4)
    y = jnp.arange(4)
    out = flow.training_losses(lambda xt, tt: model(xt, tt, y)[0], x, t, noise=eps)["loss"]
    np.testing.assert_allclose(np.asarray(out), np.mean(np.square(np.asarray(x - eps)), axis=(1, 2, 3)), rtol=1e-6)


def gaussian_velocity(mu: float, sd: float):
    """The exact velocity E[x - eps | x_t] for data N(mu, sd^2) on x_t = t x + (1 - t) eps, and the exact flow map:
    noise z at t = 0 lands at mu + sd z at t = 1."""

    def v(x, t):
        tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
        var = tb**2 * sd**2 + (1 - tb) ** 2
        resid = x - tb * mu
        return (mu + tb * sd**2 / var * resid) - (1 - tb) / var * resid

    return v


def _endpoint_error(sampler: str, steps: int, mu: float = 1.5, sd: float = 0.5) -> float:
    z = jax.random.normal(jax.random.key(1), (64, 3))
    settings = flow.FlowSampleSettings(num_steps=steps, sampler=sampler)
    x1 = jax.jit(lambda z: flow.sample(gaussian_velocity(mu, sd), z, settings))(z)
    return float(np.abs(np.asarray(x1) - (mu + sd * np.asarray(z))).max())


def test_ode_samplers_reach_the_analytic_endpoint():
    """250 Euler steps land within 1e-2 of the exact endpoint and converge at first order (twice the steps,
    half the error); Heun is second order."""
    e250, e500 = _endpoint_error("euler", 250), _endpoint_error("euler", 500)
    assert e250 < 1e-2 and 0.4 < e500 / e250 < 0.6, (e250, e500)
    h250, h500 = _endpoint_error("heun", 250), _endpoint_error("heun", 500)
    assert h250 < 1e-4 and h500 < h250 / 3, (h250, h500)


def test_euler_maruyama_samples_the_target_distribution():
    mu, sd = -0.7, 0.4
    z = jax.random.normal(jax.random.key(2), (20000,))
    settings = flow.FlowSampleSettings(num_steps=250, sampler="euler_maruyama")
    x1 = np.asarray(jax.jit(lambda z: flow.sample(gaussian_velocity(mu, sd), z, settings, key=jax.random.key(3)))(z))
    assert abs(x1.mean() - mu) < 0.02 and abs(x1.std() - sd) < 0.02
    # stochastic: not the ODE's deterministic map
    assert np.abs(x1 - (mu + sd * np.asarray(z))).max() > 0.05
    with pytest.raises(ValueError, match="needs a key"):
        flow.sample(gaussian_velocity(mu, sd), z, settings)


def test_time_grid_shift_and_last_step():
    grid = flow.sample_times(250, last_step=0.04)
    np.testing.assert_allclose(grid[:-1], np.linspace(0, 0.96, 250), atol=1e-7)
    assert grid[-1] == 1.0 and grid.dtype == np.float32
    np.testing.assert_allclose(flow.sample_times(4), [0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    shifted = flow.sample_times(4, shift=3.0)
    t = np.array([0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(shifted, t / (t + (1 - t) * 3.0), atol=1e-7)
    with pytest.raises(ValueError):
        flow.sample_times(0)
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.FlowSampleSettings(sampler="rk4")
    with pytest.raises(ValueError, match="unknown t distribution"):
        flow.sample_t(jax.random.key(0), 3, dist="beta")


def test_logit_normal_and_uniform_t():
    t = np.asarray(flow.sample_t(jax.random.key(0), 100000))
    assert 0 < t.min() and t.max() < 1 and abs(np.median(t) - 0.5) < 0.01
    logit = np.log(t / (1 - t))
    assert abs(logit.std() - 1.0) < 0.01
    u = np.asarray(flow.sample_t(jax.random.key(0), 100000, dist="uniform"))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - np.sqrt(1 / 12)) < 0.01


def test_guidance_batch_order_and_interval():
    seen = {}

    def model_fn(x, t, y):
        seen["y"] = np.asarray(y)
        return jnp.where((y == 10)[:, None], 1.0, 3.0) * jnp.ones_like(x)  # uncond -> 1, cond -> 3

    settings = flow.FlowSampleSettings(num_steps=4, cfg_scale=2.0, interval_min=0.3, interval_max=1.0)
    v = flow.guided_velocity(model_fn, jnp.array([4, 7]), 10, settings)
    x = jnp.zeros((2, 5))
    inside = v(x, jnp.full((2,), 0.5))
    np.testing.assert_allclose(np.asarray(inside), 1 + 2.0 * (3 - 1))  # uncond + s (cond - uncond)
    assert seen["y"].tolist() == [4, 10, 7, 10]  # each example's pair side by side (diffusion/guidance.py)
    for t in (0.3, 0.1, 1.0):  # the interval is open: scale 1 on and outside its ends
        np.testing.assert_allclose(np.asarray(v(x, jnp.full((2,), t))), 3.0)
