"""DPM-Solver++ (dit_jax/diffusion/dpm_solver.py) against diffusers' DPMSolverMultistepScheduler (algorithm_type
"dpmsolver++", solver_order 2, DiT's linear betas, epsilon prediction), step by step on a fixed model function,
with and without classifier-free guidance; then through dit_jax.sampling on a DiT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.diffusion import create_diffusion, dpm_solver, guidance
from dit_jax.models import DiT
from dit_jax.sampling import Sampler, SampleSettings, data_mesh, example_keys
from dit_jax.sampling.methods import guided_eps_fn

C, NULL = 4, 10
rng = np.random.default_rng(0)
E = rng.normal(0, 0.5, (NULL + 1, 2 * C)).astype(np.float32)  # a label embedding, null class included

# A fixed "model" (B, H, W, C) -> (B, H, W, 2C) (eps | learned sigma), nonlinear in x, t and the label, made of
# float32 operations that round the same in numpy and XLA (products by powers of two, max, single additions): the
# solver multiplies eps by s / alpha = 156 at the first step, so a model that rounds differently on the two sides
# (a tanh, a matmul) would hide the solver's own agreement.


def model_np(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    x2 = np.concatenate([x, x], axis=-1).astype(np.float32)
    tt = (t.astype(np.float32) / np.float32(1024.0))[:, None, None, None]
    return (np.maximum(x2, np.float32(0.0)) * np.float32(0.5) - x2 * np.float32(0.25)) + E[y][:, None, None, :] + tt


def model_jax(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    x2 = jnp.concatenate([x, x], axis=-1)
    tt = (t.astype(jnp.float32) / 1024.0)[:, None, None, None]
    return (jnp.maximum(x2, 0.0) * 0.5 - x2 * 0.25) + jnp.asarray(E)[y][:, None, None, :] + tt


def diffusers_loop(num_steps: int, x_T: np.ndarray, labels: np.ndarray, cfg: float) -> list[np.ndarray]:
    """diffusers' loop as its DiT pipeline runs it: the official [x | x], [y | null] batch, eps guided on 3
    channels, the eps half given to the scheduler. Every step's sample."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                        prediction_type="epsilon")
    # the same betas: DiT's (float64 numpy, as the official gaussian_diffusion.py) for both
    sched.alphas_cumprod = torch.from_numpy(create_diffusion("").alphas_cumprod.astype(np.float32))
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    out = []
    for t in sched.timesteps:
        tt = np.full(len(labels), int(t))
        if cfg == 1.0:
            eps = model_np(x.numpy(), tt, labels)[..., :C]
        else:
            both = model_np(np.concatenate([x.numpy()] * 2), np.concatenate([tt, tt]),
                            np.concatenate([labels, np.full_like(labels, NULL)]))
            cond, uncond = np.split(both, 2)
            eps = cond[..., :C].copy()
            eps[..., :3] = uncond[..., :3] + cfg * (cond[..., :3] - uncond[..., :3])
        # diffusers' schedulers take NCHW tensors; the update is elementwise, so NHWC is the same
        x = sched.step(torch.from_numpy(eps.astype(np.float32)), t, x).prev_sample
        out.append(x.numpy())
    return out


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_matches_diffusers_step_by_step(num_steps, cfg):
    x_T = rng.normal(size=(2, 4, 4, C)).astype(np.float32)
    labels = np.array([3, 7])
    ref = diffusers_loop(num_steps, x_T, labels, cfg)
    abar = create_diffusion("").alphas_cumprod
    y = jnp.asarray(labels)
    if cfg == 1.0:
        eps_fn = lambda x, t: model_jax(x, t, y)[..., :C]  # noqa: E731
    else:
        def eps_fn(x, t):
            out = model_jax(guidance.paired(x), guidance.paired(t), guidance.paired_labels(y, NULL))
            cond, uncond = guidance.unpair(out)
            return jnp.concatenate([guidance.combine(cond[..., :3], uncond[..., :3], cfg), cond[..., 3:C]], -1)
    ours = np.asarray(jax.jit(lambda x: dpm_solver.sample(eps_fn, x, abar, num_steps, return_all=True))(x_T))
    assert ours.shape[0] == len(ref) == num_steps
    # to 1e-5 relative (seen: <= 6e-7, float32 rounding): this model's x0 reaches the hundreds (x0 = (x - s eps) /
    # alpha, alpha = 0.0064 at t = 999), where float32 steps are 3e-5 apart
    for i, r in enumerate(ref):
        np.testing.assert_allclose(ours[i], r, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")
    assert np.abs(ref[-1]).max() > 0.5


def test_timesteps_are_diffusers_linspace_spacing():
    from diffusers import DPMSolverMultistepScheduler

    for n in (1, 7, 20, 25, 999):
        sched = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="dpmsolver++")
        sched.set_timesteps(n)
        assert dpm_solver.solver_timesteps(n).tolist() == sched.timesteps.tolist()
    with pytest.raises(ValueError):
        dpm_solver.solver_timesteps(0)


def test_sampler_runs_dpm_solver_on_a_dit_sharded_and_per_example():
    """`sampler="dpmsolver++"` through dit_jax.sampling: the library solver on the DiT's guided eps, x_T from
    example i's key as DDPM/DDIM draw it, the same samples on 1 and 8 devices and alone or in a batch."""
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                rngs=nnx.Rngs(0))
    from tests.test_ddt import randomize

    randomize(model, 3, scale=0.15)
    settings = SampleSettings(sampler="dpmsolver++", num_steps=6, cfg_scale=3.0, cfg_channels=3)
    labels, keys = np.array([1, 2, 3]), example_keys(4, np.arange(3))
    one = Sampler(model, settings, mesh=data_mesh(jax.devices()[:1]))
    got = np.asarray(one(labels, keys))
    x_T, _ = create_diffusion("").loop_noise((3, 8, 8, 4), keys)  # x_T exactly as ddpm / ddim draw it
    fn = guided_eps_fn(model, 3.0, 3)
    y = jnp.asarray(labels)
    abar = create_diffusion("").alphas_cumprod
    ref = jax.jit(lambda x: dpm_solver.sample(lambda x, t: fn(x, t, y)[..., :4], x, abar, 6))(x_T)
    # the same computation compiled in other programs (the first step multiplies float32 rounding by s / alpha ~ 150)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(ref), **tol)
    np.testing.assert_allclose(np.asarray(Sampler(model, settings, mesh=data_mesh())(labels, keys)), got, **tol)
    np.testing.assert_allclose(np.asarray(one(labels[1:2], keys[1:2]))[0], got[1], **tol)
    assert np.abs(got).max() > 0.5
