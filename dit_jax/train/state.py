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


def ddt_kwargs(model_cfg: Any, repa_cfg: Any = None) -> dict[str, Any]:
    """config.model (arch=ddt) -> DDT constructor keywords: the variant's sizes (dit_jax.models.ddt.DDT_SIZES),
    explicit sizes (> 0) overriding them; the REPA projector when repa.weight > 0."""
    from dit_jax.models.ddt import decode_ddt_variant

    arch = decode_ddt_variant(model_cfg.variant)
    for k in ("depth", "hidden_size", "num_heads", "patch_size", "num_encoder_blocks"):
        v = getattr(model_cfg, k, 0)
        if v:
            arch[k] = int(v)
    arch["num_encoder_blocks"] = min(arch["num_encoder_blocks"], arch["depth"] - 1)
    dtype = getattr(model_cfg, "dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    repa = repa_cfg is not None and repa_cfg.weight > 0
    return dict(
        arch,
        input_size=model_cfg.input_size,
        in_channels=model_cfg.in_channels,
        num_classes=model_cfg.num_classes,
        class_dropout_prob=getattr(model_cfg, "class_dropout_prob", 0.1),
        dtype=DTYPES[dtype],
        attn_impl=getattr(model_cfg, "attn_impl", "xla"),
        repa_dim=int(repa_cfg.proj_dim) if repa else 0,
        repa_hidden=int(repa_cfg.proj_hidden) if repa else 0,
    )


def target_encoder(repa_cfg: Any, seed: int = 0) -> nnx.Module:
    """REPA's frozen target encoder with random weights of the configured architecture (the trainer then loads
    repa.encoder_path into it, outside jit)."""
    from dit_jax.models.dinov2 import dinov2_vitb14, random_target_encoder

    if repa_cfg.encoder == "random":
        return random_target_encoder(depth=1, width=int(repa_cfg.proj_dim), heads=2, patch=7, seed=seed)
    if repa_cfg.encoder == "dinov2_vitb14":
        return dinov2_vitb14(rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown repa.encoder {repa_cfg.encoder!r}; expected dinov2_vitb14 or random")


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


def build_model(model_cfg: Any, seed: int = 0, repa_cfg: Any = None) -> nnx.Module:
    """A DiT, or a DDT when model.arch == "ddt" (with the REPA projector when repa.weight > 0)."""
    if getattr(model_cfg, "arch", "dit") == "ddt":
        from dit_jax.models.ddt import DDT

        return DDT(**ddt_kwargs(model_cfg, repa_cfg), rngs=nnx.Rngs(seed))
    return DiT(**model_kwargs(model_cfg), rngs=nnx.Rngs(seed))


def forward_macs(model_cfg: Any) -> int:
    """Multiply-accumulates of one forward pass of one example: analytic for a DiT (dit_jax.flops, the paper's
    count), traced from abstract shapes for a DDT (encoder + decoder)."""
    from dit_jax import flops

    if getattr(model_cfg, "arch", "dit") == "ddt":
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, 0)))
        side, c = model_cfg.input_size, model_cfg.in_channels
        x = jax.ShapeDtypeStruct((1, side, side, c), jnp.float32)
        t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
        return flops.traced_macs(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y), abstract, x, t, y)
    kw = model_kwargs(model_cfg)
    keys = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "learn_sigma",
            "num_classes", "block_type")
    return flops.dit_macs(**{k: kw[k] for k in keys})


def split_model(model: DiT) -> tuple[nnx.GraphDef, dict, dict]:
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
