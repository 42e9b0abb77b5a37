"""Model construction from a config, and the functional train state.

The trainer splits the NNX model once: graphdef (static), params (nnx.Param, trained), rest (the fixed
position table). The state that is jitted, donated and checkpointed is a plain dict of arrays:
  {"params": pure dict, "rest": pure dict, "opt_state": optax state, "step": int32 scalar, "rng": uint32 key data}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dit_jax.models.families import family

PyTree = Any


def target_encoder(repa_cfg: Any, seed: int = 0) -> nnx.Module:
    """REPA's frozen target encoder with random weights of the configured architecture (the trainer then loads
    repa.encoder_path into it, outside jit)."""
    from dit_jax.models.dinov2 import dinov2_vitb14, random_target_encoder

    if repa_cfg.encoder == "random":
        return random_target_encoder(depth=1, width=int(repa_cfg.proj_dim), heads=2, patch=7, seed=seed)
    if repa_cfg.encoder == "dinov2_vitb14":
        return dinov2_vitb14(rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown repa.encoder {repa_cfg.encoder!r}; expected dinov2_vitb14 or random")


def build_model(model_cfg: Any, seed: int = 0, repa_cfg: Any = None) -> nnx.Module:
    """The model of config.model's family (model.arch: dit_jax.models.families), with the REPA projector when
    repa.weight > 0."""
    return family(model_cfg.arch).build(model_cfg, seed, repa_cfg)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """-> (graphdef, params pure dict, rest pure dict)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def init_state(
    model_cfg: Any, optimizer: optax.GradientTransformation, seed: int, repa_cfg: Any = None
) -> tuple[nnx.GraphDef, dict]:
    """Build the model and optimizer state (call under jax.jit with out_shardings to create it sharded).
    Returns (graphdef, state); graphdef is static and identical for every call with the same config.
    With REPA on (repa_cfg.weight > 0) the state also holds "frozen": the target encoder's arrays (not trained)."""
    graphdef, params, rest = split_model(build_model(model_cfg, seed, repa_cfg))
    state = dict(
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    if repa_cfg is not None and repa_cfg.weight > 0:
        state["frozen"] = nnx.split(target_encoder(repa_cfg, seed))[1].to_pure_dict()
    return graphdef, state


def abstract_state(
    model_cfg: Any, optimizer: optax.GradientTransformation, seed: int, repa_cfg: Any = None
) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state of ShapeDtypeStructs): shapes without allocating anything."""
    out = {}

    def f():
        graphdef, state = init_state(model_cfg, optimizer, seed, repa_cfg)
        out["graphdef"] = graphdef
        return state

    shapes = jax.eval_shape(f)
    return out["graphdef"], shapes
