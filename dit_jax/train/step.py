"""The functional train step: merge the NNX model inside jit, hybrid diffusion loss, optax update, EMA.

state -> state', metrics. Randomness: rng = fold_in(base key, step) inside jit, then split for the timesteps,
the diffusion noise, label dropout and (for latents) the posterior sample, so a step's randomness depends only
on (seed, step) and not on how many devices share the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dit_jax.diffusion.gaussian import GaussianDiffusion

PyTree = Any


def sample_latents_from_moments(moments: jax.Array, key: jax.Array, scale: float) -> jax.Array:
    """(B, h, w, 2C) [mean | logvar] -> z = scale * (mean + exp(logvar / 2) * eps), a fresh posterior sample
    each step (the official train.py encodes on the fly and samples latent_dist; we keep the moments)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
    return scale * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32))


def make_train_step(
    graphdef: nnx.GraphDef,
    diffusion: GaussianDiffusion,
    optimizer: optax.GradientTransformation,
    *,
    latent_scale: float | None = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """-> train_step(state, batch) -> (state, metrics); batch = {"x": (B, H, W, C), "y": (B,)}.

    latent_scale: None for image/pixel batches; else batch["x"] holds VAE moments and a latent is sampled.
    metrics: loss, mse, vb (batch means), grad_norm, param_norm, lr-free scalars; all float32 scalars.
    """

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_noise, k_drop, k_latent = jax.random.split(rng, 4)
        x, y = batch["x"], batch["y"]
        if latent_scale is not None:
            x = sample_latents_from_moments(x, k_latent, latent_scale)
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)

        def loss_fn(params: dict) -> tuple[jax.Array, dict]:
            model = nnx.merge(graphdef, params, state["rest"])

            def model_fn(x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
                return model(x_t, t, y, train=True, rng=k_drop)

            terms = diffusion.training_losses(model_fn, x, t, model_kwargs=dict(y=y), key=k_noise)
            return jnp.mean(terms["loss"]), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(
            loss=loss,
            mse=jnp.mean(terms["mse"]),
            grad_norm=optax.global_norm(grads),
            param_norm=optax.global_norm(params),
        )
        if "vb" in terms:
            metrics["vb"] = jnp.mean(terms["vb"])
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        return new_state, metrics

    return train_step
