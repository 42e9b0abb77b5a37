"""DINOv2 ViT (facebookresearch/dinov2, no registers) in Flax NNX, NHWC: the REPA target encoder of DDT.

DDT (MCG-NJU/DDT, src/diffusion/stateful_flow_matching/training_repa.py, class DINOv2) aligns an intermediate
denoiser layer with the patch tokens of torch hub's `dinov2_vitb14` (ViT-B/14, LVD-142M). Its wrapper does

    x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(images)            # images (B, 3, H, W) in [0, 1]
    x = F.interpolate(x, (int(224*H/256), int(224*W/256)), mode='bicubic')     # align_corners=False, no antialias
    encoder.pos_embed.data = timm.layers.pos_embed.resample_abs_pos_embed(pos_embed_518, [h/14, w/14])
    feature = encoder.forward_features(x)['x_norm_patchtokens']

and `repa_features` below is that, with images (B, H, W, 3). timm's resample_abs_pos_embed (timm/layers/pos_embed.py)
keeps the class token's row and resizes the (37, 37) grid part with F.interpolate(mode='bicubic', antialias=True,
align_corners=False), returning the table unchanged when the new grid is square with the same token count.
DINOv2's own `interpolate_pos_encoding` then sees a table whose size matches the tokens and returns it as it is
for square inputs. (For non-square inputs the official code would go on to re-interpolate the resampled table and
fail its `N == M * M` assertion; we use the timm-resampled table, the evident intent.)

Architecture (dinov2/models/vision_transformer.py DinoVisionTransformer with dinov2/hub/backbones.py defaults:
img_size 518, patch 14, init_values 1.0, ffn "mlp", block_chunks 0, qkv/proj/ffn biases; dinov2/layers/*.py):

    patch_embed.proj   Conv p x p, stride p, bias                   (B, H, W, 3) -> (B, h*w, D), row-major tokens
    cls_token (1, 1, D), pos_embed (1, 1 + G*G, D) for the G x G pretraining grid (G = 518 / 14 = 37),
    mask_token (1, D) (iBOT masking; loaded, never used here)
    blocks.i:  x = x + ls1(attn(norm1(x)));  x = x + ls2(mlp(norm2(x)))
        norm1/norm2  LayerNorm eps 1e-6 with scale and bias
        attn         qkv Linear(D, 3D) (q | k | v, head-major), softmax(q k^T * head_dim**-0.5) v, proj Linear(D, D)
        ls1/ls2      LayerScale: x * gamma, gamma (D,)
        mlp          fc1 Linear(D, 4D) -> exact (erf) GELU -> fc2 Linear(4D, D)
    norm               LayerNorm eps 1e-6;  x_norm_clstoken = norm(x)[:, 0], x_norm_patchtokens = norm(x)[:, 1:]

Weights: dit_jax.convert.dinov2 (load_dinov2 / load_dinov2_file) maps the official key layout one to one.

Precision: everything runs in float32 (REPA normalises the target features in float32). Matrix products use jax's
default matmul precision: set `jax.config.update("jax_default_matmul_precision", "highest")` for faithful float32
on GPUs/TPUs (TF32/bf16 passes otherwise). The bicubic resizes are explicit separable matrices (numpy, float64,
cast to float32) applied at HIGHEST precision, matching torch's kernels to ~1e-6.

The encoder is frozen: nothing here stops gradients; a caller that must not train it wraps its output in
`jax.lax.stop_gradient` (and does not hand its parameters to the optimiser).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.layers import Attention, linear

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm.data IMAGENET_DEFAULT_STD
LN_EPS = 1e-6
VITB14 = dict(depth=12, width=768, num_heads=12, patch_size=14, pos_grid=37, mlp_ratio=4.0)

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------
# Bicubic resizing as torch.nn.functional.interpolate(mode="bicubic", align_corners=False) does it.
# ----------------------------------------------------------------------------------------------------------
def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) with parameter a (support |x| < 2)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _bicubic_matrix_cached(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    # align_corners=False with an explicit output size: scale = in / out. torch computes the scale and the source
    # coordinates in float32 (opmath of a float32 tensor); we do too, since at 256 px a float64 coordinate moves
    # the result by ~1e-4 on a rough image. The weights are then evaluated in float64.
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if not antialias:
        # aten/src/ATen/native/UpSample.h (area_pixel_compute_source_index with cubic=True, no clamping at 0) and
        # the cpu kernel's cubic weights: source x = scale * (i + 0.5) - 0.5, taps floor(x) - 1 .. floor(x) + 2 with
        # weights W(t + 1), W(t), W(1 - t), W(2 - t) for t = x - floor(x), Keys a = -0.75, tap indices clamped to
        # [0, in - 1] (upsample_get_value_bounded), so out-of-range taps repeat the edge pixel. x is
        # (float32 scale) * (i + 0.5) - 0.5 evaluated with double literals and rounded once to float32, as torch's
        # area_pixel_compute_source_index returns it (checked against torch's weights to 5e-7).
        src = (np.float64(scale) * (rows + 0.5) - 0.5).astype(np.float32)
        base = np.floor(src)
        t = (src - base).astype(np.float64)
        for k in range(-1, 3):
            idx = np.clip(base.astype(np.int64) + k, 0, in_size - 1)
            np.add.at(m, (rows, idx), _keys_cubic(t - k, -0.75))
    else:
        # The antialiased kernel (aten/src/ATen/native/cpu/UpSampleKernel.cpp, _compute_indices_min_size_weights_aa,
        # the PIL-style separable resampler): centre c = scale * (i + 0.5); on downsampling (scale > 1) the kernel is
        # stretched by scale (support 2 * scale, argument divided by scale); taps j in
        # [max(trunc(c - support + 0.5), 0), min(trunc(c + support + 0.5), in)), weight W((j - c + 0.5) / s) with
        # Keys a = -0.5, normalised to sum 1 over the taps that exist (no edge clamping).
        stretch = max(scale, np.float32(1.0))
        support = np.float32(2.0) * stretch
        for i in range(out_size):
            c = np.float32(np.float64(scale) * (i + 0.5))  # float32, rounded once
            lo = max(int(c - support + np.float32(0.5)), 0)
            hi = min(int(c + support + np.float32(0.5)), in_size)
            j = np.arange(lo, hi)
            w = _keys_cubic((j - np.float64(c) + 0.5) / np.float64(stretch), -0.5)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
    m.setflags(write=False)
    return m


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix R with resized = R @ signal, along one axis, as torch computes it:
    F.interpolate(mode="bicubic", align_corners=False), antialias False (Keys a = -0.75, edge clamping) or True
    (Keys a = -0.5, support widened by the scale on downsampling, weights renormalised at the borders).
    The returned array is read-only (it is cached)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    return _bicubic_matrix_cached(int(in_size), int(out_size), bool(antialias))


def resize_bicubic(x: jax.Array, size: tuple[int, int], antialias: bool = False) -> jax.Array:
    """Bicubic resize of x (B, H, W, C) -> (B, h, w, C) in float32, as torch's F.interpolate(mode="bicubic",
    align_corners=False, antialias=antialias) on the NCHW tensor. No clamping of the result."""
    x = jnp.asarray(x, jnp.float32)
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) != (out_h, out_w):  # both kernels are the identity at scale 1
        mh = jnp.asarray(bicubic_matrix(in_h, out_h, antialias), jnp.float32)
        mw = jnp.asarray(bicubic_matrix(in_w, out_w, antialias), jnp.float32)
        x = jnp.einsum("ow,bhwc->bhoc", mw, x, precision=_HIGHEST)
        x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=_HIGHEST)
    return x


def resample_abs_pos_embed(pos_embed: jax.Array, new_size: tuple[int, int], num_prefix_tokens: int = 1) -> jax.Array:
    """timm.layers.pos_embed.resample_abs_pos_embed with its defaults (bicubic, antialias=True, square old grid):
    (1, P + G*G, D) -> (1, P + h*w, D). The prefix rows are kept; unchanged when h == w and the count matches."""
    h, w = int(new_size[0]), int(new_size[1])
    n = pos_embed.shape[1]
    if h * w + num_prefix_tokens == n and h == w:
        return pos_embed
    g = int(math.sqrt(n - num_prefix_tokens))
    if g * g != n - num_prefix_tokens:
        raise ValueError(f"position table of {n - num_prefix_tokens} grid tokens is not a square grid")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    d = pos_embed.shape[-1]
    grid = resize_bicubic(grid.reshape(1, g, g, d), (h, w), antialias=True).reshape(1, h * w, d)
    return jnp.concatenate([prefix.astype(jnp.float32), grid], axis=1)


def repa_input_size(image_hw: tuple[int, int]) -> tuple[int, int]:
    """The DDT wrapper's encoder resolution for (H, W) images: (int(224 * H / 256), int(224 * W / 256))."""
    h, w = image_hw
    return int(224 * h / 256), int(224 * w / 256)


# ----------------------------------------------------------------------------------------------------------
# The target-encoder interface REPA consumes.
# ----------------------------------------------------------------------------------------------------------
@runtime_checkable
class TargetEncoder(Protocol):
    """A frozen image encoder giving REPA's alignment targets.

    images (B, H, W, 3) float in [0, 1] -> features (B, num_tokens((H, W)), feature_dim) float32. Implementations do
    not stop gradients; the REPA loss wraps the call in jax.lax.stop_gradient.
    """

    feature_dim: int

    def num_tokens(self, image_hw: tuple[int, int]) -> int: ...

    def __call__(self, images: jax.Array) -> jax.Array: ...


# ----------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------
trunc_normal_002 = nnx.initializers.truncated_normal(stddev=0.02)  # init_weights_vit_timm (approximately)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance (E[(x - mean)^2], as torch), not E[x^2] - E[x]^2: DINOv2's residual stream has large
    # outlier channels, where the fast formula loses float32 digits.
    return nnx.LayerNorm(
        dim, epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
    )


class LayerScale(nnx.Module):
    """dinov2/layers/layer_scale.py: x * gamma, gamma (D,) initialised to init_values."""

    def __init__(self, dim: int, init_values: float = 1.0):
        self.gamma = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class DinoMlp(nnx.Module):
    """dinov2/layers/mlp.py: fc1 -> exact erf GELU (nn.GELU()) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, rngs, kernel_init=trunc_normal_002)
        self.fc2 = linear(hidden, dim, rngs, kernel_init=trunc_normal_002)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DinoBlock(nnx.Module):
    """dinov2/layers/block.py Block at inference: pre-norm attention and MLP, each scaled by a LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, layerscale_init: float = 1.0):
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, rngs=rngs, qkv_bias=True)  # scale head_dim**-0.5, q | k | v layout
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = DinoMlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.ls2 = LayerScale(dim, layerscale_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoPatchEmbed(nnx.Module):
    """dinov2/layers/patch_embed.py: Conv p x p stride p with bias; (B, H, W, C) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_channels, dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:  # the official PatchEmbed asserts this too (no silent cropping)
            raise ValueError(f"input size {h} x {w} is not a multiple of the patch size {p}")
        y = self.proj(x)
        return y.reshape(b, (h // p) * (w // p), y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------
class DinoViT(nnx.Module):
    """DINOv2 vision transformer without registers (see the module docstring). Implements TargetEncoder.

    depth, width (D), num_heads, patch_size, pos_grid (G: pos_embed holds 1 + G*G rows, the pretraining grid),
    mlp_ratio, in_channels, layerscale_init (the official init_values, 1.0). Parameters are float32 nnx.Params.
    """

    def __init__(
        self,
        *,
        depth: int,
        width: int,
        num_heads: int,
        patch_size: int,
        pos_grid: int,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        layerscale_init: float = 1.0,
        rngs: nnx.Rngs,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.depth, self.width, self.num_heads = depth, width, num_heads
        self.patch_size, self.pos_grid, self.mlp_ratio, self.in_channels = patch_size, pos_grid, mlp_ratio, in_channels
        self.feature_dim = width
        self.patch_embed = DinoPatchEmbed(patch_size, in_channels, width, rngs=rngs)
        # init_weights: cls_token N(0, 1e-6), pos_embed truncated N(0, 0.02), mask_token zeros
        k_cls, k_pos = jax.random.split(rngs.params())
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(k_cls, (1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(trunc_normal_002(k_pos, (1, 1 + pos_grid * pos_grid, width), jnp.float32))
        self.mask_token = nnx.Param(jnp.zeros((1, width), jnp.float32))
        self.blocks = nnx.List(
            [DinoBlock(width, num_heads, mlp_ratio, rngs=rngs, layerscale_init=layerscale_init) for _ in range(depth)]
        )
        self.norm = _layer_norm(width, rngs)

    # -- geometry ------------------------------------------------------------------------------------------
    def patch_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of an encoder input of size hw (H, W) (must be multiples of the patch size)."""
        return hw[0] // self.patch_size, hw[1] // self.patch_size

    def num_tokens(self, image_hw: tuple[int, int]) -> int:
        """Patch tokens that repa_features gives for (H, W) images (after the 224/256 resize)."""
        gh, gw = self.patch_grid(repa_input_size(image_hw))
        return gh * gw

    def pos_embed_for(self, grid: tuple[int, int]) -> jax.Array:
        """(1, 1 + h*w, D): the pretraining table resampled to the (h, w) token grid as the DDT wrapper does."""
        return resample_abs_pos_embed(self.pos_embed[...], grid)

    # -- forward -------------------------------------------------------------------------------------------
    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """x (B, H, W, C) already normalised, H and W multiples of the patch size ->
        {"x_norm_clstoken": (B, D), "x_norm_patchtokens": (B, h*w, D), "x_prenorm": (B, 1 + h*w, D)}, float32."""
        x = jnp.asarray(x, jnp.float32)
        b, h, w, _ = x.shape
        tokens = self.patch_embed(x)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.width))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = tokens + self.pos_embed_for(self.patch_grid((h, w)))
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:], "x_prenorm": tokens}

    def preprocess(self, images: jax.Array) -> jax.Array:
        """The DDT wrapper's input pipeline: images (B, H, W, 3) in [0, 1] -> ImageNet mean/std normalisation ->
        bicubic resize (no antialias) to (int(224 H / 256), int(224 W / 256)). float32."""
        x = jnp.asarray(images, jnp.float32)
        mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(IMAGENET_STD, jnp.float32)
        x = (x - mean) / std  # torchvision Normalize: sub_(mean).div_(std)
        return resize_bicubic(x, repa_input_size(x.shape[1:3]), antialias=False)

    def repa_features(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) in [0, 1] -> REPA targets x_norm_patchtokens (B, num_tokens((H, W)), D), float32."""
        return self.forward_features(self.preprocess(images))["x_norm_patchtokens"]

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.repa_features(images)


def dinov2_vitb14(*, rngs: nnx.Rngs | None = None, **overrides: Any) -> DinoViT:
    """DINOv2 ViT-B/14 (torch hub `dinov2_vitb14`): depth 12, width 768, 12 heads, patch 14, 37 x 37 grid (518 px),
    MLP ratio 4. Random init; load the released weights with dit_jax.convert.dinov2.load_dinov2(_file)."""
    kw = dict(VITB14, **overrides)
    return DinoViT(rngs=rngs if rngs is not None else nnx.Rngs(0), **kw)


def random_target_encoder(
    depth: int = 2, width: int = 32, heads: int = 2, patch: int = 14, seed: int = 0, pos_grid: int = 16
) -> DinoViT:
    """A small randomly initialised DinoViT for tests of REPA (frozen: callers stop gradients themselves).

    Same class and pipeline as the real encoder: (B, H, W, 3) in [0, 1] -> (B, num_tokens, width). pos_grid is its
    "pretraining" grid (16 = the 224 px grid of patch 14, so 256 px images use the table unchanged)."""
    return DinoViT(depth=depth, width=width, num_heads=heads, patch_size=patch, pos_grid=pos_grid, rngs=nnx.Rngs(seed))
