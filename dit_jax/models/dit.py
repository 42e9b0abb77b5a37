"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, ICCV 2023), in Flax NNX.

Follows facebookresearch/DiT `models.py` one class to one class (DiTBlock, FinalLayer, DiT, DiT_models) so that
the official state_dict converts by renaming and transposing alone. Differences on purpose:
  * NHWC in and out: x (B, H, W, C) -> (B, H, W, out_channels).
  * label dropout takes an explicit `rng` (functional training) instead of `self.training` + torch RNG.
  * the paper's other block designs (section 3.2, Figure 5) are selectable with `block_type`.
  * optional stacked blocks (`scan_blocks`) with a remat policy, a compute dtype and an attention switch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.constants import BLOCK_TYPES, MODEL_SIZES, PATCH_SIZES  # the paper's designs and sizes (sec. 3.2, Table 1)
from dit_jax.models.layers import (
    ATTENTION_IMPLS,
    Attention,
    CrossAttention,
    Dtype,
    FixedEmbed,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    affine_layer_norm,
    get_2d_sincos_pos_embed,
    layer_norm,
    linear,
    modulate,
    zeros,
)

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise work
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DiTBlock(nnx.Module):
    """One transformer block. x: (B, T, D), c: (B, D) conditioning vector, cond: (B, 2, D) [t_emb, y_emb].

    adaLN-Zero: shift/scale/gate for attention and MLP regressed from c, gates zero at init (identity block).
    adaLN:      shift/scale only (Linear(D, 4D)), default init, no gates.
    cross-attn: standard pre-norm ViT block plus cross-attention to the two condition tokens after self-attention.
    in-context: standard pre-norm ViT block; the condition tokens were appended to the sequence by the model.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        block_type: str = "adaLN-Zero",
        dtype: Dtype = None,
        attn_impl: str = "xla",
    ):
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"unknown block_type {block_type!r}; expected one of {BLOCK_TYPES}")
        self.block_type = block_type
        self.attn = Attention(hidden_size, num_heads, rngs=rngs, qkv_bias=True, dtype=dtype, attn_impl=attn_impl)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs, dtype=dtype)
        if block_type in ("adaLN-Zero", "adaLN"):
            n_mod = 6 if block_type == "adaLN-Zero" else 4
            init = zeros if block_type == "adaLN-Zero" else nnx.initializers.xavier_uniform()
            # Sequential(SiLU, Linear) mirrors torch's adaLN_modulation.0 / adaLN_modulation.1.
            self.adaLN_modulation = nnx.Sequential(
                nnx.silu, linear(hidden_size, n_mod * hidden_size, rngs, dtype=dtype, kernel_init=init)
            )
        else:
            self.norm1 = affine_layer_norm(hidden_size, rngs)
            self.norm2 = affine_layer_norm(hidden_size, rngs)
            if block_type == "cross-attn":
                self.norm_cross = affine_layer_norm(hidden_size, rngs)
                self.cross_attn = CrossAttention(hidden_size, num_heads, rngs=rngs, dtype=dtype, attn_impl=attn_impl)

    def __call__(self, x: jax.Array, c: jax.Array, cond: jax.Array, mod: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), c (B, D), cond (B, 2, D); mod (B, n_mod * D): this block's adaLN_modulation(c) when the
        caller computed every block's at once (DiT with scan_blocks), else computed here."""
        if mod is None and self.block_type in ("adaLN-Zero", "adaLN"):
            mod = self.adaLN_modulation(c)
        if self.block_type == "adaLN-Zero":
            mod = mod.astype(jnp.float32)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
            x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
            x = x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
            return x
        if self.block_type == "adaLN":
            mod = mod.astype(jnp.float32)
            shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, axis=-1)
            x = x + self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
            x = x + self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
            return x
        x = x + self.attn(self.norm1(x))
        if self.block_type == "cross-attn":
            x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nnx.Module):
    """LayerNorm (+ adaLN shift/scale for the adaLN designs) then Linear(D, p*p*out_channels), zero-initialised.

    x: (B, T, D), c: (B, D) -> (B, T, p*p*out_channels).
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        *,
        rngs: nnx.Rngs,
        adaptive: bool = True,
        dtype: Dtype = None,
    ):
        self.adaptive = adaptive
        self.linear = linear(hidden_size, patch_size * patch_size * out_channels, rngs, dtype=dtype, kernel_init=zeros)
        if adaptive:
            self.adaLN_modulation = nnx.Sequential(
                nnx.silu, linear(hidden_size, 2 * hidden_size, rngs, dtype=dtype, kernel_init=zeros)
            )
        else:
            self.norm_final = affine_layer_norm(hidden_size, rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        if self.adaptive:
            shift, scale = jnp.split(self.adaLN_modulation(c).astype(jnp.float32), 2, axis=-1)
            x = modulate(layer_norm(x), shift, scale)
        else:
            x = self.norm_final(x)
        return self.linear(x).astype(jnp.float32)


def _concrete(x: jax.Array) -> np.ndarray | None:
    """x as numpy when it has a value now (eager call), None under tracing (jit, grad, vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_inputs(model: nnx.Module, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
    """Shape, dtype and label-range checks shared by DiT and DDT (attributes input_size, in_channels,
    num_classes, y_embedder), with messages that name the expected layout."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, C) with rank 4, got shape {tuple(x.shape)}")
    b, h, w, ch = x.shape
    if (h, w) != (model.input_size, model.input_size) or ch != model.in_channels:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but this model takes (B, {model.input_size}, {model.input_size}, "
            f"{model.in_channels}) (input_size={model.input_size}, in_channels={model.in_channels})"
        )
    if jnp.shape(t) != (b,):
        raise ValueError(f"t must have shape ({b},) (one timestep per example), got {tuple(jnp.shape(t))}")
    if jnp.shape(y) != (b,):
        raise ValueError(f"y must have shape ({b},) (one label per example), got {tuple(jnp.shape(y))}")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {jnp.result_type(y)}")
    labels = _concrete(y)
    if labels is not None and labels.size:
        n_rows = model.y_embedder.embedding_table.num_embeddings
        if labels.min() < 0 or labels.max() >= n_rows:
            bad = sorted(set(labels[(labels < 0) | (labels >= n_rows)].tolist()))
            null = f" (index {model.num_classes} is the null class)" if n_rows > model.num_classes else ""
            raise ValueError(f"labels out of range [0, {n_rows - 1}]{null}: {bad[:10]}")


class DiT(nnx.Module):
    """Diffusion model with a Transformer backbone.

    __call__(x, t, y): x (B, H, W, C) latents, t (B,) timesteps (the original 0..999 indices), y (B,) int
    labels (num_classes = the null class) -> (B, H, W, out_channels); out_channels = 2C with learn_sigma
    ([eps | variance interpolation v]).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        block_type: str = "adaLN-Zero",
        dtype: Dtype = None,
        attn_impl: str = "xla",
        scan_blocks: bool = False,
        remat_policy: str = "none",
        timestep_freq_shift: float = 0.0,
        rngs: nnx.Rngs | None = None,
    ):
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"unknown block_type {block_type!r}; expected one of {BLOCK_TYPES}")
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTENTION_IMPLS}")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.block_type = block_type
        self.scan_blocks = scan_blocks
        self.remat_policy = remat_policy
        self.dtype = dtype

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, rngs=rngs, dtype=dtype)
        self.t_embedder = TimestepEmbedder(
            hidden_size, rngs=rngs, downscale_freq_shift=timestep_freq_shift, dtype=dtype
        )
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        grid = input_size // patch_size
        self.pos_embed = FixedEmbed(jnp.asarray(get_2d_sincos_pos_embed(hidden_size, grid)[None], jnp.float32))

        def make_block(r: nnx.Rngs) -> DiTBlock:
            return DiTBlock(
                hidden_size, num_heads, mlp_ratio, rngs=r, block_type=block_type, dtype=dtype, attn_impl=attn_impl
            )

        if scan_blocks:
            # One DiTBlock whose parameters carry a leading depth axis; applied with lax.scan.
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stacked(r: nnx.Rngs) -> DiTBlock:
                return make_block(r)

            self.blocks = make_stacked(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.final_layer = FinalLayer(
            hidden_size,
            patch_size,
            self.out_channels,
            rngs=rngs,
            adaptive=block_type in ("adaLN-Zero", "adaLN"),
            dtype=dtype,
        )

    # ------------------------------------------------------------------------------------------------------
    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        check_inputs(self, x, t, y)

    def unpatchify(self, x: jax.Array) -> jax.Array:
        """(B, T, p*p*C) with channel fastest, as the official (h, w, p, q, c) -> (B, h*p, w*q, C)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
        return x.reshape(x.shape[0], h * p, w * p, c)

    def _all_modulations(self, c: jax.Array) -> jax.Array | None:
        """Every block's adaLN_modulation(c) in one matmul over the stacked kernels (scan_blocks, adaLN designs):
        (depth, B, n_mod * D). Each entry is the same dot product as the block's own Linear (SiLU, then
        c @ kernel + bias in the compute dtype); one wide matmul instead of `depth` narrow ones inside the scan,
        which on accelerators is one well-shaped kernel instead of depth weight-bandwidth-bound ones."""
        if self.block_type not in ("adaLN-Zero", "adaLN"):
            return None
        lin = self.blocks.adaLN_modulation.layers[1]
        kernel, bias = lin.kernel.value, lin.bias.value  # (depth, D, n_mod * D), (depth, n_mod * D)
        s = nnx.silu(c)
        if lin.dtype is not None:
            s, kernel, bias = s.astype(lin.dtype), kernel.astype(lin.dtype), bias.astype(lin.dtype)
        return jnp.einsum("bd,ldk->lbk", s, kernel, precision=lin.precision) + bias[:, None, :]

    def _run_blocks(self, x: jax.Array, c: jax.Array, cond: jax.Array) -> jax.Array:
        policy = REMAT_POLICIES[self.remat_policy]
        remat = self.remat_policy != "none"

        if self.scan_blocks:
            graphdef, state = nnx.split(self.blocks)
            mods = self._all_modulations(c)  # (depth, B, n_mod * D) or None

            def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
                s, mod = xs
                return nnx.merge(graphdef, s)(h, c, cond, mod), None

            if remat:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            x, _ = jax.lax.scan(body, x, (state, mods))
            return x

        for block in self.blocks:
            if remat:
                graphdef, state = nnx.split(block)

                def apply(s, h: jax.Array) -> jax.Array:
                    return nnx.merge(graphdef, s)(h, c, cond)

                x = jax.checkpoint(apply, policy=policy)(state, x)
            else:
                x = block(x, c, cond)
        return x

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x (B, H, W, C), t (B,), y (B,) -> (B, H, W, out_channels), float32.

        train=True applies label dropout (probability class_dropout_prob) and then needs `rng`.
        """
        self._check_inputs(x, t, y)
        h = self.x_embedder(x).astype(jnp.float32) + self.pos_embed.value  # (B, T, D)
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = self.y_embedder(y, train, rng, force_drop_ids).astype(jnp.float32)  # (B, D)
        c = t_emb + y_emb  # (B, D)
        cond = jnp.stack([t_emb, y_emb], axis=1)  # (B, 2, D): tokens for cross-attn / in-context
        n_tokens = h.shape[1]
        if self.block_type == "in-context":
            h = jnp.concatenate([h, cond], axis=1)
        h = self._run_blocks(h, c, cond)
        h = h[:, :n_tokens]
        h = self.final_layer(h, c)  # (B, T, p*p*out_channels)
        return self.unpatchify(h)

    def forward_with_cfg(
        self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float | jax.Array, cfg_channels: int | None = 3
    ) -> jax.Array:
        """Classifier-free guidance in one batched pass (the official `forward_with_cfg`).

        The batch is [conditional half | unconditional half] (y's second half holds the null class); only the
        first half of x is used and duplicated. Guidance eps = uncond + s * (cond - uncond) is applied to the
        first `cfg_channels` output channels: 3 reproduces the official release (and its published FIDs);
        None guides all `in_channels` eps channels, the standard formulation.
        """
        b = x.shape[0]
        if b % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond | uncond], got {b}")
        n = self.in_channels if cfg_channels is None else cfg_channels
        if not 0 < n <= self.out_channels:
            raise ValueError(f"cfg_channels must be in [1, {self.out_channels}], got {cfg_channels}")
        half = x[: b // 2]
        model_out = self(jnp.concatenate([half, half], axis=0), t, y)
        eps, rest = model_out[..., :n], model_out[..., n:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = jnp.concatenate([half_eps, half_eps], axis=0)
        return jnp.concatenate([eps, rest], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# The twelve configurations of the paper: MODEL_SIZES x PATCH_SIZES (dit_jax/constants.py, Table 1).
# ----------------------------------------------------------------------------------------------------------


def decode_variant(variant: str) -> dict[str, int]:
    """"XL/2" or "DiT-XL/2" -> dict(depth, hidden_size, num_heads, patch_size). Unknown names raise."""
    name = variant.removeprefix("DiT-")
    size, _, patch = name.partition("/")
    if size not in MODEL_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        known = ", ".join(DiT_models)
        raise ValueError(f"unknown DiT variant {variant!r}; known: {known}")
    return dict(MODEL_SIZES[size], patch_size=int(patch))


def _constructor(variant: str) -> Callable[..., DiT]:
    def make(**kwargs) -> DiT:
        return DiT(**decode_variant(variant), **kwargs)

    make.__name__ = "DiT_" + variant.replace("/", "_")
    make.__doc__ = f"DiT-{variant}: {decode_variant(variant)}; keyword arguments go to DiT."
    return make


DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{p}": _constructor(f"{size}/{p}") for size in ("XL", "L", "B", "S") for p in PATCH_SIZES
}
