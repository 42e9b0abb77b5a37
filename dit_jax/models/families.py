"""The model-family table: one row per architecture a config's `model.arch` names (docs/ARCHITECTURE.md, "Where to
add"). Everything that depends on the architecture (building the model from a config, restoring a run, the config
checks, sampling, the FLOP count) reads it from here instead of testing the name.

    fam = family(config.model.arch)          # or family_of(model)
    model = fam.build(config.model, seed=0, repa_cfg=config.repa)

- dit: the DiT of Peebles & Xie (2023), facebookresearch/DiT models.py; trains with Gaussian diffusion, or reads its
  output as a velocity (objective=flow, SiT-style); FLOPs by the paper's analytic count.
- ddt: the Decoupled Diffusion Transformer (MCG-NJU/DDT): a condition encoder and a velocity decoder; trains with
  flow matching only; FLOPs traced from the compiled forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dit_jax.models.ddt import DDT, DDT_models, decode_ddt_variant
from dit_jax.models.dit import DiT, DiT_models, decode_variant

# config.model.dtype -> the compute dtype (parameters stay float32)
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[name]


def _sizes(decoded: dict[str, int], model_cfg: Any, keys: tuple[str, ...]) -> dict[str, int]:
    """The variant's sizes, explicit config sizes (> 0) overriding them."""
    for k in keys:
        v = getattr(model_cfg, k)
        if v:
            decoded[k] = int(v)
    return decoded


# The config.model fields each family reads: the sizes (0 = the variant's), and the options passed to the
# constructor as they are (besides model.variant and model.dtype, read by every family)
_SIZE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")
_DIT_SIZES = _SIZE_KEYS
_DDT_SIZES = (*_SIZE_KEYS, "num_encoder_blocks")
_DIT_OPTIONS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "block_type",
                "attn_impl", "scan_blocks", "remat_policy")
_DDT_OPTIONS = ("input_size", "in_channels", "num_classes", "class_dropout_prob", "attn_impl")


def _options(model_cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(model_cfg, k) for k in keys}


def _dit_kwargs(model_cfg: Any, repa_cfg: Any = None) -> dict[str, Any]:
    """config.model (arch=dit) -> DiT constructor keywords."""
    del repa_cfg  # REPA applies to a DDT only (the config checks refuse it here)
    arch = _sizes(decode_variant(model_cfg.variant), model_cfg, _DIT_SIZES)
    return dict(arch, **_options(model_cfg, _DIT_OPTIONS), dtype=compute_dtype(model_cfg.dtype))


def _ddt_kwargs(model_cfg: Any, repa_cfg: Any = None) -> dict[str, Any]:
    """config.model (arch=ddt) -> DDT constructor keywords: the variant's sizes (dit_jax.models.ddt.DDT_SIZES),
    explicit sizes (> 0) overriding them; the REPA projector when repa.weight > 0."""
    arch = _sizes(decode_ddt_variant(model_cfg.variant), model_cfg, _DDT_SIZES)
    arch["num_encoder_blocks"] = min(arch["num_encoder_blocks"], arch["depth"] - 1)
    repa = repa_cfg is not None and repa_cfg.weight > 0
    return dict(
        arch,
        **_options(model_cfg, _DDT_OPTIONS),
        dtype=compute_dtype(model_cfg.dtype),
        repa_dim=int(repa_cfg.proj_dim) if repa else 0,
        repa_hidden=int(repa_cfg.proj_hidden) if repa else 0,
    )


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture. kwargs(model_cfg, repa_cfg) -> the constructor's keywords; variants: the released sizes
    by name; objectives: what it trains with (the first is the default); analytic_macs: the FLOP counter uses the
    paper's closed form (else it traces the forward); title: its name in messages; model_keys: the config.model
    fields kwargs reads (the config checks call any other model.* key set on the command line inapplicable);
    fixed: config.model fields whose value is built into the family -> (that value, why) (a DDT predicts the
    velocity only: learn_sigma False);
    repa: REPA can align one of its (encoder) blocks to a frozen target encoder."""

    name: str
    cls: type
    variants: Mapping[str, Callable[..., nnx.Module]]
    decode_variant: Callable[[str], dict[str, int]]
    kwargs: Callable[..., dict[str, Any]]
    objectives: tuple[str, ...]
    analytic_macs: bool
    title: str = ""
    model_keys: tuple[str, ...] = ()
    fixed: Mapping[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    repa: bool = False

    def build(self, model_cfg: Any, seed: int = 0, repa_cfg: Any = None) -> nnx.Module:
        return self.cls(**self.kwargs(model_cfg, repa_cfg), rngs=nnx.Rngs(seed))


FAMILIES: dict[str, Family] = {
    "dit": Family("dit", DiT, DiT_models, decode_variant, _dit_kwargs, ("diffusion", "flow"), analytic_macs=True,
                  title="DiT", model_keys=("variant", "dtype", *_DIT_SIZES, *_DIT_OPTIONS)),
    "ddt": Family("ddt", DDT, DDT_models, decode_ddt_variant, _ddt_kwargs, ("flow",), analytic_macs=False,
                  title="DDT", model_keys=("variant", "dtype", *_DDT_SIZES, *_DDT_OPTIONS),
                  fixed={"learn_sigma": (False, "predicts the velocity only")}, repa=True),
}


def family(name: str) -> Family:
    """The family config.model.arch names (ValueError for an unknown one)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model.arch {name!r}; expected one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nnx.Module) -> Family:
    """The family of a built model."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.cls):
            return fam
    raise TypeError(f"{type(model).__name__} is not a model of any family in dit_jax.models.families")
