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

from dit_jax.models import DiT
from dit_jax.models.dit import decode_variant

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_kwargs(model_cfg: Any) -> dict[str, Any]:
    """config.model -> DiT constructor keywords. Explicit depth/hidden_size/num_heads/patch_size (> 0) override
    the variant's."""
    arch = decode_variant(model_cfg.variant)
    for k in ("depth", "hidden_size", "num_heads", "patch_size"):
        v = getattr(model_cfg, k, 0)
        if v:
            arch[k] = int(v)
    dtype = getattr(model_cfg, "dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    return dict(
        arch,
        input_size=model_cfg.input_size,
        in_channels=model_cfg.in_channels,
        num_classes=model_cfg.num_classes,
        learn_sigma=getattr(model_cfg, "learn_sigma", True),
        class_dropout_prob=getattr(model_cfg, "class_dropout_prob", 0.1),
        block_type=getattr(model_cfg, "block_type", "adaLN-Zero"),
        dtype=DTYPES[dtype],
        attn_impl=getattr(model_cfg, "attn_impl", "xla"),
        scan_blocks=getattr(model_cfg, "scan_blocks", False),
        remat_policy=getattr(model_cfg, "remat_policy", "none"),
    )


def build_model(model_cfg: Any, seed: int = 0) -> DiT:
    return DiT(**model_kwargs(model_cfg), rngs=nnx.Rngs(seed))


def split_model(model: DiT) -> tuple[nnx.GraphDef, dict, dict]:
    """-> (graphdef, params pure dict, rest pure dict)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def init_state(model_cfg: Any, optimizer: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, dict]:
    """Build the model and optimizer state (call under jax.jit with out_shardings to create it sharded).
    Returns (graphdef, state); graphdef is static and identical for every call with the same config."""
    graphdef, params, rest = split_model(build_model(model_cfg, seed))
    state = dict(
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, state


def abstract_state(model_cfg: Any, optimizer: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state of ShapeDtypeStructs): shapes without allocating anything."""
    out = {}

    def f():
        graphdef, state = init_state(model_cfg, optimizer, seed)
        out["graphdef"] = graphdef
        return state

    shapes = jax.eval_shape(f)
    return out["graphdef"], shapes
