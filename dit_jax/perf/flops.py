"""Analytic parameter counts and forward-pass compute of DiT, in the paper's convention; `forward_macs` of any model
family (the `dit-jax flops` command is dit_jax.perf.cli).

Compute convention (the "Gflops" of Peebles & Xie, Tables 1 and 4 and Figure 5):
  * ONE forward pass with batch 1, counted in multiply-accumulates (MACs): a (m, k) @ (k, n) matmul is m*k*n.
    The paper's "118.6 Gflops" for DiT-XL/2 at 256 px is 118.6e9 MACs, i.e. about 237 GFLOP counted the way XLA
    and most hardware counters do (1 MAC = 2 FLOP).
  * counted: the patch-embedding conv (a matmul per patch), the timestep MLP, every Linear of every block
    (fused qkv, attention proj, MLP fc1/fc2, the adaLN / adaLN-Zero modulation Linear applied once to the
    conditioning vector c), attention logits QK^T and the product AV (L*L*D each for L tokens, whatever the
    number of heads), the cross-attention block's q/kv/proj Linears and its attention against the 2 condition
    tokens, the final layer's adaLN Linear and output Linear.
  * NOT counted (cost 0): embedding lookups (the label table), the fixed pos_embed addition, the sinusoidal
    timestep features, bias additions, and all other elementwise work (LayerNorms, softmax, SiLU/GELU,
    modulate, gates, residual adds, unpatchify). XLA's cost analysis counts those as well, so it reports a
    little more than 2 * dit_macs (0.3% more for DiT-XL/2; see tests/test_flops.py).
  * This reproduces every Gflops value of the paper's Table 4 within 0.6% (S/8: 0.358 printed as 0.36), and
    within 0.02% for all models above 1 Gflop (XL/2: 118.62 against 118.64).
  * `traced_macs(fn, *args)` counts the same thing independently from a jaxpr (dot_general and conv MACs);
    the tests check that it equals `dit_macs` exactly for every variant and block design.

Parameter convention: trainable parameters only (every nnx.Param), i.e. WITHOUT the fixed 2-D sin-cos
`pos_embed` table (T * D values), by default. That is the convention the paper's Table 4 follows: excluding it,
all sixteen printed Params (M) values of Table 4 are matched exactly after rounding to whole millions, while including it turns DiT-B/2 into 131M (printed 130) and the 512 px DiT-XL/2 into
676M (printed 675). The official PyTorch train.py logs `sum(p.numel() for p in model.parameters())`, which also
counts the frozen `nn.Parameter` pos_embed (675,129,632 for DiT-XL/2 at 256 px against 674,834,720 trainable):
pass `include_pos_embed=True` for that number. The label table has num_classes + 1 rows (the null class used by
classifier-free guidance) when class_dropout_prob > 0, as in the model. The VAE is not counted (nor is it in the
paper).

Configuration keywords are those of `dit_jax.models.DiT`: depth, hidden_size, num_heads, patch_size, input_size
(latent side, image_size / 8), in_channels, learn_sigma, num_classes, class_dropout_prob, block_type, mlp_ratio,
plus frequency_embedding_size (256 in DiT). `variant_config("DiT-XL/2", image_size=256)` builds them.
"""

from __future__ import annotations

import inspect
from typing import Any

from dit_jax.constants import BLOCK_TYPES, MODEL_SIZES, PATCH_SIZES  # the paper's designs and sizes, without jax

COND_TOKENS = 2  # [t_emb, y_emb]: the condition sequence of the cross-attn and in-context designs


def variant_names() -> list[str]:
    """The DiT variants of dit_jax.models.dit (its size and patch tables) in the paper's Table 4 order: smallest
    width first, then the largest patch first (DiT-S/8, DiT-S/4, DiT-S/2, DiT-B/8, ..., DiT-XL/2)."""

    sizes = sorted(MODEL_SIZES, key=lambda s: (MODEL_SIZES[s]["hidden_size"], MODEL_SIZES[s]["depth"]))
    return [f"DiT-{size}/{p}" for size in sizes for p in sorted(PATCH_SIZES, reverse=True)]


def variant_config(name: str, image_size: int = 256, **overrides: Any) -> dict[str, Any]:
    """Keyword configuration for dit_macs / dit_params of a named variant ("DiT-XL/2" or "XL/2").

    image_size is in pixels; the latent side is image_size / 8 (the SD VAE), with 4 channels. Other keywords
    (block_type, num_classes, learn_sigma, ...) override the defaults of DiT_models.
    """
    from dit_jax.models.dit import decode_variant  # lazy: the variant table lives with the model

    if image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8 (the VAE downsamples by 8), got {image_size}")
    cfg: dict[str, Any] = dict(decode_variant(name), input_size=image_size // 8)
    cfg.update(overrides)
    return cfg


def _normalise(
    depth: int,
    hidden_size: int,
    num_heads: int,
    patch_size: int,
    input_size: int = 32,
    in_channels: int = 4,
    learn_sigma: bool = True,
    num_classes: int = 1000,
    class_dropout_prob: float = 0.1,
    block_type: str = "adaLN-Zero",
    mlp_ratio: float = 4.0,
    frequency_embedding_size: int = 256,
) -> dict[str, Any]:
    """Validate a configuration and derive the sizes both counts need."""
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"unknown block_type {block_type!r}; expected one of {BLOCK_TYPES}")
    sizes = dict(
        depth=depth,
        hidden_size=hidden_size,
        num_heads=num_heads,
        patch_size=patch_size,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        frequency_embedding_size=frequency_embedding_size,
    )
    for key, val in sizes.items():
        if int(val) != val or val <= 0:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    out_channels = 2 * in_channels if learn_sigma else in_channels
    return dict(
        block_type=block_type,
        depth=depth,
        d=hidden_size,
        t=(input_size // patch_size) ** 2,  # image tokens
        patch_in=patch_size * patch_size * in_channels,  # values per input patch
        patch_out=patch_size * patch_size * out_channels,  # values per output patch
        mlp=int(hidden_size * mlp_ratio),  # as DiTBlock: Mlp(D, int(D * mlp_ratio))
        rows=num_classes + int(class_dropout_prob > 0),  # label table, with the null class for CFG
        freq=frequency_embedding_size,
    )


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------
def _linear(din: int, dout: int) -> int:
    return din * dout + dout  # kernel + bias


def param_breakdown(**config: Any) -> dict[str, int]:
    """Parameters per top-level component (names of the model's attributes), pos_embed listed on its own."""
    c = _normalise(**config)
    d, kind = c["d"], c["block_type"]
    block = _linear(d, 3 * d) + _linear(d, d) + _linear(d, c["mlp"]) + _linear(c["mlp"], d)  # attn + mlp
    if kind in ("adaLN-Zero", "adaLN"):
        block += _linear(d, (6 if kind == "adaLN-Zero" else 4) * d)  # adaLN_modulation
    else:
        block += 2 * 2 * d  # norm1, norm2: affine LayerNorms (scale + bias)
        if kind == "cross-attn":
            block += 2 * d + _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)  # norm_cross, q, kv, proj
    final = _linear(d, c["patch_out"])
    final += _linear(d, 2 * d) if kind in ("adaLN-Zero", "adaLN") else 2 * d  # adaLN (shift, scale) | norm_final
    return {
        "x_embedder": c["patch_in"] * d + d,  # conv p x p, stride p, with bias
        "pos_embed": c["t"] * d,  # fixed sin-cos table (not an nnx.Param)
        "t_embedder": _linear(c["freq"], d) + _linear(d, d),
        "y_embedder": c["rows"] * d,
        "blocks": c["depth"] * block,
        "final_layer": final,
    }


def dit_params(include_pos_embed: bool = False, **config: Any) -> int:
    """Number of parameters of a DiT: the trainable ones (paper convention), plus the fixed pos_embed if asked."""
    parts = param_breakdown(**config)
    if not include_pos_embed:
        parts.pop("pos_embed")
    return sum(parts.values())


# --------------------------------------------------------------------------------------------------------------
# Multiply-accumulates
# --------------------------------------------------------------------------------------------------------------
def macs_breakdown(**config: Any) -> dict[str, int]:
    """Multiply-accumulates of one batch-1 forward pass, per component (see the module docstring)."""
    c = _normalise(**config)
    d, t, kind, depth, s = c["d"], c["t"], c["block_type"], c["depth"], COND_TOKENS
    seq = t + s if kind == "in-context" else t  # in-context: the 2 condition tokens ride along in every block
    out = {
        "x_embedder": t * c["patch_in"] * d,
        "t_embedder": c["freq"] * d + d * d,
        "y_embedder": 0,  # a table lookup
        "blocks.attn_linear": depth * (3 * seq * d * d + seq * d * d),  # qkv + proj
        "blocks.attn_scores": depth * 2 * seq * seq * d,  # QK^T + AV over all heads
        "blocks.mlp": depth * 2 * seq * d * c["mlp"],
        "blocks.adaLN": 0,
        "blocks.cross_attn": 0,
        "final_layer": t * d * c["patch_out"],
    }
    if kind in ("adaLN-Zero", "adaLN"):
        out["blocks.adaLN"] = depth * d * (6 if kind == "adaLN-Zero" else 4) * d  # once per example, not per token
        out["final_layer"] += d * 2 * d
    if kind == "cross-attn":
        # q and proj on the T image tokens, kv on the 2 condition tokens, QK^T and AV against 2 keys.
        out["blocks.cross_attn"] = depth * (t * d * d + s * d * 2 * d + 2 * t * s * d + t * d * d)
    return out


def dit_macs(**config: Any) -> int:
    """Multiply-accumulates of one forward pass with batch 1: the paper's "Gflops" (times 1e9)."""
    return sum(macs_breakdown(**config).values())


# --------------------------------------------------------------------------------------------------------------
# The table of all twelve variants
# --------------------------------------------------------------------------------------------------------------
def flops_table(image_size: int = 256, block_type: str = "adaLN-Zero", **overrides: Any) -> list[dict[str, Any]]:
    """One row per variant, in the paper's Table 4 order (S/8, S/4, S/2, B/8, ..., XL/2).

    Each row: name, image_size, input_size (latent side), tokens, block_type, params (int, trainable: the paper's
    convention), params_m (millions), params_with_pos_embed (int, the official train.py count), macs (int),
    gflops (the paper's Gflops = macs / 1e9).
    """
    rows = []
    for name in variant_names():
        cfg = variant_config(name, image_size, block_type=block_type, **overrides)
        params, macs = dit_params(**cfg), dit_macs(**cfg)
        rows.append(
            dict(
                name=name,
                image_size=image_size,
                input_size=cfg["input_size"],
                tokens=(cfg["input_size"] // cfg["patch_size"]) ** 2,
                block_type=block_type,
                params=params,
                params_m=params / 1e6,
                params_with_pos_embed=dit_params(include_pos_embed=True, **cfg),
                macs=macs,
                gflops=macs / 1e9,
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table: model, tokens, params (M), GFLOPs (MACs)."""
    head = f"{'model':<10} {'tokens':>6} {'params (M)':>11} {'GFLOPs (MACs)':>14}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['name']:<10} {r['tokens']:>6d} {r['params_m']:>11.2f} {r['gflops']:>14.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# An independent count from a traced function
# --------------------------------------------------------------------------------------------------------------
def traced_macs(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of every dot_general and conv_general_dilated in the jaxpr of fn(*args, **kwargs).

    args may be abstract (jax.ShapeDtypeStruct, or the state of an `nnx.eval_shape` model), so nothing is
    allocated. Everything else (gathers, elementwise work, reductions) counts 0, as in `dit_macs`; the bodies of
    scan count `length` times (stacked blocks), those of pjit / remat / custom_jvp once, a cond its costliest
    branch. A while loop has no static trip count and raises.
    """
    import jax  # lazy: the analytic counts above need no jax

    return _jaxpr_macs(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _prod(xs: Any) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _sub_jaxprs(value: Any) -> list[Any]:
    """The jaxprs held in one equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_macs(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += _prod(eqn.outvars[0].aval.shape) * _prod(lhs[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            # each output element is a dot over the kernel's input features (already / groups) and window
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += _prod(eqn.outvars[0].aval.shape) * (_prod(rhs) // rhs[out_feature_dim])
        elif name == "while":
            raise NotImplementedError("traced_macs: a while loop has no static trip count")
        else:
            subs = [_jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
            if not subs:
                continue
            if name == "cond":
                total += max(subs)  # one branch runs
            elif name == "scan":
                total += int(eqn.params["length"]) * sum(subs)
            else:
                total += sum(subs)
    return total


# --------------------------------------------------------------------------------------------------------------
# Any model family, from its config
# --------------------------------------------------------------------------------------------------------------
_COUNT_KEYWORDS = frozenset(inspect.signature(_normalise).parameters)  # what dit_macs reads of a DiT's keywords


def forward_macs(model_cfg: Any) -> int:
    """Multiply-accumulates of one forward pass of one example of the model config.model describes, as its family
    (dit_jax.models.families, by model_cfg.arch) counts them: the paper's analytic count (`dit_macs`) for a family
    with analytic_macs, else traced (`traced_macs`) from the abstract model (nnx.eval_shape: nothing allocated)."""
    from dit_jax.models.families import family  # lazy: jax, flax and the models

    fam = family(model_cfg.arch)
    if fam.analytic_macs:
        kwargs = fam.kwargs(model_cfg)
        return dit_macs(**{k: v for k, v in kwargs.items() if k in _COUNT_KEYWORDS})

    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: fam.build(model_cfg)))
    side, c = model_cfg.input_size, model_cfg.in_channels
    x = jax.ShapeDtypeStruct((1, side, side, c), jnp.float32)
    t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    return traced_macs(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y), abstract, x, t, y)
