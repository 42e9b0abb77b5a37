"""DDT: the Decoupled Diffusion Transformer (Wang et al. 2025; MCG-NJU/DDT decoupled_improved_dit.py), in Flax NNX.

A condition encoder turns the noisy input, the timestep and the label into a self-condition s (one vector per
token); a velocity decoder regresses the flow-matching velocity from the noisy input, modulated token-wise by s.
Passing s back in skips the encoder, which is how samplers share it across neighbouring steps.

Classes mirror the reference one to one (Embed, TimestepEmbedder, LabelEmbedder, RMSNorm, FeedForward, RAttention,
DDTBlock, FinalLayer, DDT) and keep its parameter names, so `load_official_ddt` is a near-identity. The numeric
spec, as MCG-NJU/DDT implements it:
  * blocks: RMSNorm (eps 1e-6, learnable), attention without qkv bias, per-head RMSNorm on q and k, 2-D RoPE
    (positions spread over [0, 16] on each axis whatever the grid, frequencies 1 / 10000^(k / hd) for k = 0, 4, ...,
    x and y interleaved, rotating adjacent channel pairs), SwiGLU with hidden int(2 * int(4 D) / 3), adaLN as a
    plain Linear(D, 6D) on an already-SiLU'd condition; no absolute position embedding.
  * c = silu(t_emb + y_emb) for the encoder; s = silu(t_emb + encoder_out) for the decoder and the final layer.
  * patches are unfold/fold order (channel slowest): a token is the (C, p, p) block flattened.
  * init: patch embedders Xavier, label table N(0, 0.02), timestep MLP weights N(0, 0.02), final layer zero;
    every other Linear keeps PyTorch's default init (the block gates are NOT zero, unlike DiT's adaLN-Zero).
Differences on purpose: NHWC in and out; label dropout is inside the model (rng passed explicitly), as in our DiT.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.constants import MODEL_SIZES
from dit_jax.models.dit import check_inputs
from dit_jax.models.layers import (
    Dtype,
    LabelEmbedder,
    TimestepEmbedder,
    attention,
    check_attention_args,
    layer_norm,
    linear,
    xavier_uniform,
    zeros,
)


# ----------------------------------------------------------------------------------------------------------
# PyTorch's default nn.Linear init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for weight and bias.
# ----------------------------------------------------------------------------------------------------------
torch_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(din: int, dout: int, rngs: nnx.Rngs, *, dtype: Dtype = None, use_bias: bool = True) -> nnx.Linear:
    return linear(din, dout, rngs, dtype=dtype, kernel_init=torch_linear_kernel_init, use_bias=use_bias,
                  bias_init=torch_linear_bias_init(din))


# ----------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding.
# ----------------------------------------------------------------------------------------------------------
def rope_2d_angles(head_dim: int, height: int, width: int, theta: float = 10000.0, scale: float = 16.0) -> np.ndarray:
    """(height * width, head_dim // 2) rotation angles (reference `precompute_freqs_cis_2d`).

    Token n = row * width + col; positions are linspace(0, scale, n) on each axis (so the whole grid always spans
    [0, scale]); frequencies 1 / theta^(k / head_dim) for k = 0, 4, 8, ... (head_dim / 4 of them); the rotated pair
    m = 2a + b uses the column's angle for b = 0 and the row's for b = 1 (x and y interleaved).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    xs = np.linspace(0.0, scale, width, dtype=np.float32)
    ys = np.linspace(0.0, scale, height, dtype=np.float32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    freqs = (1.0 / theta ** (np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / head_dim)).astype(
        np.float32
    )
    ax = np.outer(xx.reshape(-1), freqs).astype(np.float32)  # (N, hd/4)
    ay = np.outer(yy.reshape(-1), freqs).astype(np.float32)
    return np.stack([ax, ay], axis=-1).reshape(height * width, head_dim // 2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs (2m, 2m+1) of x (B, N, H, hd) by angles (N, hd/2), in float32."""
    dtype = x.dtype
    b, n, h, hd = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, h, hd // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(b, n, h, hd).astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------
def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift with shift/scale already broadcastable: (B, 1, D) or token-wise (B, N, D)."""
    return x * (1 + scale) + shift


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) in float32, cast back, times a learnable weight (LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class Embed(nnx.Module):
    """Linear patch embedding of unfolded (C * p * p) patches: proj (Xavier, zero bias)."""

    def __init__(self, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.proj = linear(in_chans, embed_dim, rngs, dtype=dtype, kernel_init=xavier_uniform)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden int(2 * hidden_dim / 3), no biases."""

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        hidden = int(2 * hidden_dim / 3)
        self.w1 = torch_linear(dim, hidden, rngs, dtype=dtype, use_bias=False)
        self.w3 = torch_linear(dim, hidden, rngs, dtype=dtype, use_bias=False)
        self.w2 = torch_linear(hidden, dim, rngs, dtype=dtype, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(nnx.silu(self.w1(x)) * self.w3(x))


class RAttention(nnx.Module):
    """Self-attention with qk RMSNorm and 2-D RoPE: qkv Linear(D, 3D) without bias, proj with bias."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = None, attn_impl: str = "xla"):
        check_attention_args(dim, num_heads, attn_impl)
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        head_dim = dim // num_heads
        self.qkv = torch_linear(dim, 3 * dim, rngs, dtype=dtype, use_bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = torch_linear(dim, dim, rngs, dtype=dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        """x: (B, N, D), angles (N, hd/2) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(self.q_norm(q), angles), apply_rope(self.k_norm(k), angles)
        out = attention(q, k, v, self.attn_impl)
        return self.proj(out.reshape(b, n, d))


class DDTBlock(nnx.Module):
    """x + gate * attn(modulate(norm1 x)), x + gate * mlp(modulate(norm2 x)); modulation Linear(D, 6D) of c,
    where c is (B, 1, D) (the encoder's silu(t + y)) or (B, N, D) (the decoder's token-wise self-condition)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        attn_impl: str = "xla",
    ):
        self.norm1 = RMSNorm(hidden_size)
        self.attn = RAttention(hidden_size, num_heads, rngs=rngs, dtype=dtype, attn_impl=attn_impl)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = FeedForward(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs, dtype=dtype)
        # nn.Sequential(Linear) in the reference: the official key is adaLN_modulation.0
        self.adaLN_modulation = nnx.Sequential(torch_linear(hidden_size, 6 * hidden_size, rngs, dtype=dtype))

    def __call__(self, x: jax.Array, c: jax.Array, angles: jax.Array) -> jax.Array:
        mod = self.adaLN_modulation(c).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa).astype(x.dtype), angles)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp).astype(x.dtype))
        return x


class FinalLayer(nnx.Module):
    """LayerNorm (no affine, eps 1e-6), adaLN shift/scale from c (no SiLU: c is already activated), Linear to
    C * p * p; modulation and linear zero-initialised."""

    def __init__(self, hidden_size: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.linear = linear(hidden_size, out_dim, rngs, dtype=dtype, kernel_init=zeros)
        self.adaLN_modulation = nnx.Sequential(
            linear(hidden_size, 2 * hidden_size, rngs, dtype=dtype, kernel_init=zeros)
        )

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(c).astype(jnp.float32), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale).astype(x.dtype)).astype(jnp.float32)


class Projector(nnx.Module):
    """REPA's projector MLP, Linear(D, H) - SiLU - Linear(H, H) - SiLU - Linear(H, Z), torch default init
    (MCG-NJU/DDT training_repa.py `proj`; it lives in the trainer there, in the model here so that it is
    trained, EMA'd and checkpointed with it)."""

    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.layers = nnx.Sequential(
            torch_linear(din, hidden, rngs), nnx.silu, torch_linear(hidden, hidden, rngs), nnx.silu,
            torch_linear(hidden, dout, rngs),
        )

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.layers(h.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Patches in unfold / fold order.
# ----------------------------------------------------------------------------------------------------------
def unfold_patches(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, C * p * p), each token the (C, p, p) block flattened (torch unfold)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def fold_patches(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """Inverse of unfold_patches: (B, N, C * p * p) -> (B, H, W, C)."""
    b, n, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, h // p, w // p, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------
class DDT(nnx.Module):
    """Condition encoder (blocks[:num_encoder_blocks]) + velocity decoder (the rest) + final layer.

    x (B, H, W, C) NHWC, t (B,) in [0, 1] (t = 0 is noise, 1 is data), y (B,) int -> (v (B, H, W, C), s (B, N, D)).
    num_encoder_blocks == depth (no decoder) is not allowed; num_encoder_blocks == 0 is the "improved DiT"
    single-stream baseline (see ImprovedDiT).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        num_encoder_blocks: int = 22,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        dtype: Dtype = None,
        attn_impl: str = "xla",
        repa_dim: int = 0,
        repa_hidden: int = 0,
        rngs: nnx.Rngs = None,
    ):
        """repa_dim > 0 adds the REPA projector `repa_proj` (D -> repa_hidden or D -> repa_dim) for training."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if not 0 <= num_encoder_blocks < depth:
            raise ValueError(f"num_encoder_blocks must be in [0, depth={depth}), got {num_encoder_blocks}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_encoder_blocks = num_encoder_blocks
        self.num_classes = num_classes
        patch_dim = in_channels * patch_size * patch_size
        self.x_embedder = Embed(patch_dim, hidden_size, rngs=rngs, dtype=dtype)
        if num_encoder_blocks:
            self.s_embedder = Embed(patch_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.t_embedder = TimestepEmbedder(hidden_size, rngs=rngs, max_period=10.0, dtype=dtype,
                                           bias_init=torch_linear_bias_init)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        self.blocks = nnx.List([
            DDTBlock(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, attn_impl=attn_impl)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_dim, rngs=rngs, dtype=dtype)
        if repa_dim:
            self.repa_proj = Projector(hidden_size, repa_hidden or hidden_size, repa_dim, rngs=rngs)

    def angles(self) -> jax.Array:
        g = self.input_size // self.patch_size
        return jnp.asarray(rope_2d_angles(self.hidden_size // self.num_heads, g, g))

    def _embed_condition(self, t: jax.Array, y: jax.Array, train: bool, rng: jax.Array | None,
                         force_drop_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        t_emb = self.t_embedder(t)[:, None, :]  # (B, 1, D)
        y_emb = self.y_embedder(y, train, rng, force_drop_ids)[:, None, :]
        return t_emb, nnx.silu(t_emb + y_emb)

    def encode(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
        return_block: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The condition encoder: -> s (B, N, D) = silu(t_emb + encoder(x)). return_block=k also returns the
        output of block k (1-based, before the final silu; REPA aligns it), as (s, h)."""
        if not self.num_encoder_blocks:
            raise ValueError("this model has no condition encoder (num_encoder_blocks=0)")
        check_inputs(self, x, t, y)
        if return_block is not None and not 1 <= return_block <= self.num_encoder_blocks:
            raise ValueError(f"return_block must be in [1, {self.num_encoder_blocks}], got {return_block}")
        t_emb, c = self._embed_condition(t, y, train, rng, force_drop_ids)
        angles = self.angles()
        h = self.s_embedder(unfold_patches(x, self.patch_size)).astype(jnp.float32)
        feature = None
        for i in range(self.num_encoder_blocks):
            h = self.blocks[i](h, c, angles)
            if return_block == i + 1:
                feature = h
        s = nnx.silu(t_emb + h)
        return s if return_block is None else (s, feature)

    def decode(self, x: jax.Array, s: jax.Array) -> jax.Array:
        """The velocity decoder: x (B, H, W, C), s (B, N, D) -> v (B, H, W, C)."""
        b, h, w, c = x.shape
        n = (h // self.patch_size) * (w // self.patch_size)
        if s.shape != (b, n, self.hidden_size):
            raise ValueError(f"s has shape {tuple(s.shape)}; expected ({b}, {n}, {self.hidden_size})")
        angles = self.angles()
        z = self.x_embedder(unfold_patches(x, self.patch_size)).astype(jnp.float32)
        for i in range(self.num_encoder_blocks, self.depth):
            z = self.blocks[i](z, s, angles)
        return fold_patches(self.final_layer(z, s), self.patch_size, h, w)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        s: jax.Array | None = None,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """-> (v, s). With s given the encoder is skipped (t and y are then unused)."""
        if not self.num_encoder_blocks:
            return self._single_stream(x, t, y, train, rng, force_drop_ids), None
        if s is None:
            s = self.encode(x, t, y, train=train, rng=rng, force_drop_ids=force_drop_ids)
        return self.decode(x, s), s

    def _single_stream(self, x, t, y, train, rng, force_drop_ids) -> jax.Array:
        """improved_dit.py's DiT: every block and the final layer conditioned on c = silu(t + y)."""
        check_inputs(self, x, t, y)
        _, c = self._embed_condition(t, y, train, rng, force_drop_ids)
        b, h, w, _ = x.shape
        angles = self.angles()
        z = self.x_embedder(unfold_patches(x, self.patch_size)).astype(jnp.float32)
        for block in self.blocks:
            z = block(z, c, angles)
        return fold_patches(self.final_layer(z, c), self.patch_size, h, w)


# ----------------------------------------------------------------------------------------------------------
# Sizes: DiT's (dit_jax.constants.MODEL_SIZES: depth, width, heads) split into encoder + decoder blocks. XL/2 is
# the paper's 22 encoder + 6 decoder blocks (674,646,352 parameters); B/2 and L/2 follow the paper's 8En4De and
# 20En4De; S/2 (not in the paper) takes B's split at DiT-S width.
# ----------------------------------------------------------------------------------------------------------
DDT_ENCODER_BLOCKS: dict[str, int] = {"S": 8, "B": 8, "L": 20, "XL": 22}
DDT_SIZES: dict[str, dict[str, int]] = {
    size: dict(MODEL_SIZES[size], num_encoder_blocks=n) for size, n in DDT_ENCODER_BLOCKS.items()
}


def decode_ddt_variant(variant: str) -> dict[str, int]:
    """"XL/2" or "DDT-XL/2" -> dict(depth, hidden_size, num_heads, num_encoder_blocks, patch_size)."""
    name = variant.removeprefix("DDT-").removeprefix("ImprovedDiT-")
    size, _, patch = name.partition("/")
    if size not in DDT_SIZES or patch not in ("1", "2", "4", "8"):
        raise ValueError(f"unknown DDT variant {variant!r}; expected one of {sorted(DDT_models)}")
    return dict(DDT_SIZES[size], patch_size=int(patch))


def _ddt(size: str, single_stream: bool = False) -> Callable[..., DDT]:
    def make(**kwargs) -> DDT:
        arch = dict(DDT_SIZES[size], patch_size=2)
        if single_stream:
            arch["num_encoder_blocks"] = 0
        return DDT(**{**arch, **kwargs})

    make.__name__ = f"{'ImprovedDiT' if single_stream else 'DDT'}_{size}_2"
    return make


DDT_models: dict[str, Callable[..., DDT]] = {f"DDT-{s}/2": _ddt(s) for s in DDT_SIZES}
# the "improved DiT" single-stream baseline of the DDT paper, built from the same blocks
ImprovedDiT_models: dict[str, Callable[..., DDT]] = {f"ImprovedDiT-{s}/2": _ddt(s, True) for s in DDT_SIZES}


def ImprovedDiT(**kwargs) -> DDT:  # noqa: N802 (a constructor, like the reference's class)
    """The single-stream baseline: a DDT without encoder (num_encoder_blocks=0); __call__ returns (v, None)."""
    return DDT(**{**kwargs, "num_encoder_blocks": 0})
