"""The functional train step for flow-matching models (DDT, and a DiT read as a velocity model), with REPA.

Same contract as train/step.py: train_step(state, batch) -> (state, metrics), the NNX model merged inside jit,
randomness fold_in(seed key, step), so a step does not depend on how many devices share the batch. The loss is
DDT's (MCG-NJU/DDT stateful_flow_matching/training_repa.py):
    x_t = t x + (1 - t) eps,  t ~ sigmoid(N(0, 1)) (or U[0, 1)),  fm = mean((v - (x - eps))^2)
    loss = fm + repa.weight * mean_tokens(1 - cos(proj(h_align), stop_gradient(target_encoder(images))))
REPA's frozen target encoder lives in state["frozen"] (never differentiated, never updated); its images are
batch["images"] (uint8, stored beside the latents) mapped to [0, 1] when the batch has them, else the pixel-space
x mapped from [-1, 1] to [0, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.train.repa import repa_loss
from dit_jax.train.step import sample_latents_from_moments


def make_flow_loss(
    graphdef: nnx.GraphDef,
    *,
    t_dist: str = "logit_normal",
    latent_scale: float | None = None,
    repa_weight: float = 0.0,
    repa_layer: int = 8,
    encoder_graphdef: nnx.GraphDef | None = None,
    time_scale: float = 1.0,
    fm_weight: float = 1.0,
) -> Callable[..., tuple[jax.Array, dict]]:
    """-> loss_fn(params, frozen, rest, batch, rng) -> (mean loss, aux); see the module docstring.

    time_scale multiplies t before the model sees it (1 for DDT; e.g. 1000 for a DiT's timestep embedder).
    fm_weight scales the flow term (1; 0 isolates REPA in tests).
    """
    if repa_weight and encoder_graphdef is None:
        raise ValueError("REPA (repa_weight > 0) needs the target encoder's graphdef")
    if t_dist not in flow.T_DISTS:
        raise ValueError(f"unknown t distribution {t_dist!r}; expected one of {flow.T_DISTS}")

    def loss_fn(params: dict, frozen: Any, rest: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        k_t, k_noise, k_drop, k_latent = jax.random.split(rng, 4)
        x, y = batch["x"], batch["y"]
        if latent_scale is not None:
            x = sample_latents_from_moments(x, k_latent, latent_scale)
        x = x.astype(jnp.float32)
        t = flow.sample_t(k_t, x.shape[0], t_dist)
        noise = jax.random.normal(k_noise, x.shape, jnp.float32)
        x_t = flow.interpolate(x, noise, t)
        model = nnx.merge(graphdef, params, rest)
        kw = dict(train=True, rng=k_drop)
        if repa_weight:
            if "images" in batch:  # latent batches carry the stored uint8 images (extract-latents --store-images)
                images = batch["images"].astype(jnp.float32) / 255.0
            elif latent_scale is None:
                images = (x + 1.0) / 2.0  # pixel-space x in [-1, 1]
            else:
                raise ValueError("REPA on latent batches needs batch['images'] (the clean images)")
            if images.shape[-1] == 1:  # grey images: the target encoder takes RGB
                images = jnp.repeat(images, 3, axis=-1)
            target = jax.lax.stop_gradient(nnx.merge(encoder_graphdef, frozen)(images))  # frozen: no gradient
            s, h = model.encode(x_t, t * time_scale, y, return_block=repa_layer, **kw)
            v = model.decode(x_t, s)
        else:
            out = model(x_t, t * time_scale, y, **kw)
            v = out[0] if isinstance(out, tuple) else out[..., : x.shape[-1]]
        fm = jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(x, noise)), axis=(1, 2, 3))
        aux = {"fm_loss": jnp.mean(fm)}
        per_example = fm_weight * fm
        if repa_weight:
            r = repa_loss(model.repa_proj, h, target)
            aux["repa_loss"] = jnp.mean(r)
            per_example = per_example + repa_weight * r
        return jnp.mean(per_example), aux

    return loss_fn


def make_flow_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, **loss_kw: Any
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """-> train_step(state, batch); batch = {"x": (B, H, W, C), "y": (B,)[, "images": uint8 (B, h, w, 3)]};
    loss_kw as make_flow_loss. metrics: loss, fm_loss, repa_loss (when on), grad_norm, param_norm."""
    loss_fn = make_flow_loss(graphdef, **loss_kw)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        frozen = state.get("frozen")
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], frozen, state["rest"], batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params), **aux)
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

    return train_step


def frozen_state(encoder: nnx.Module) -> Any:
    """The target encoder's arrays as a pure dict for state["frozen"] (graphdef kept by the caller)."""
    return nnx.split(encoder)[1].to_pure_dict()

