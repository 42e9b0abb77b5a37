"""Building blocks shared by DiT (and later DDT): embedders, fixed position tables, attention, MLP.

Names mirror facebookresearch/DiT `models.py` (x_embedder.proj, t_embedder.mlp, y_embedder.embedding_table,
attn.qkv, attn.proj, mlp.fc1, mlp.fc2) so that weight conversion stays a near-identity.
All arrays are NHWC / (batch, tokens, channels); PyTorch Linear weights (out, in) become kernels (in, out).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type | None

# ----------------------------------------------------------------------------------------------------------
# Initialisers (DiT `initialize_weights`).
# ----------------------------------------------------------------------------------------------------------
# xavier_uniform on a (in, out) kernel has the same fans as torch's on the (out, in) weight.
xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)
# DiT Xavier-initialises the patch conv "like nn.Linear" on its flattened (D, C*p*p) view: fan_in = C*p*p and
# fan_out = D. Flax's default fans for a (p, p, C, D) conv kernel would multiply fan_out by p*p.
patch_kernel_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)


class FixedEmbed(nnx.Variable):
    """A constant table (the sin-cos position embedding): kept in the state, never trained.

    It is a Variable rather than a Python constant because the official state_dict carries it
    (`pos_embed`) and EMA'd releases hold a slightly drifted copy that we load as-is.
    """


# ----------------------------------------------------------------------------------------------------------
# Fixed sinusoidal tables.
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, downscale_freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal timestep features, [cos | sin]  (GLIDE / DiT `TimestepEmbedder.timestep_embedding`).

    freqs_k = exp(-ln(max_period) * k / (half - downscale_freq_shift)), k = 0..half-1. The official DiT
    divides by `half` (shift 0); diffusers' DiT uses shift 1 and so differs from the official model.

    t: (B,) float or int timesteps (fractional allowed). Returns (B, dim) float32: always float32, since
    bf16 cannot represent 999 * freq accurately.
    """
    half = dim // 2
    # The frequencies are a constant, computed as the reference does in float32 (float32 exponent, then exp),
    # with the exp correctly rounded: torch's float32 exp is, in all but ~2 of 128 places, and XLA's CPU exp
    # is not (off by an ulp in ~17 of 128), which at t = 999 moves an argument by up to 3e-5 rad.
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(
        half - downscale_freq_shift
    )
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) float64 table, [sin | cos], omega_k = 1 / 10000^(k / (embed_dim/2))."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D table of DiT (from MAE): (grid_size**2, embed_dim) float64.

    Token n = row * grid_size + col. As in the official code (meshgrid with w first), the first
    embed_dim/2 channels encode the column index and the last embed_dim/2 the row index.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    # The official code builds the grid in float32 before the float64 einsum; integers are exact either way.
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij"
    )
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    return np.concatenate([emb_col, emb_row], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Embedders.
# ----------------------------------------------------------------------------------------------------------
def linear(
    din: int,
    dout: int,
    rngs: nnx.Rngs,
    *,
    dtype: Dtype = None,
    kernel_init: Callable = xavier_uniform,
    use_bias: bool = True,
    bias_init: Callable = zeros,
) -> nnx.Linear:
    """nnx.Linear with DiT's default init (xavier_uniform weight, zero bias) and fp32 params."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Conv p x p, stride p, with bias (timm PatchEmbed). (B, H, W, C) -> (B, H/p * W/p, D), row-major tokens."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_channels,
            hidden_size,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            use_bias=True,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=patch_kernel_init,
            bias_init=zeros,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class TimestepEmbedder(nnx.Module):
    """t (B,) -> (B, D): 256 sinusoidal frequencies then Linear-SiLU-Linear (weights N(0, 0.02))."""

    def __init__(
        self,
        hidden_size: int,
        *,
        rngs: nnx.Rngs,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        downscale_freq_shift: float = 0.0,
        dtype: Dtype = None,
        bias_init: Callable[[int], Callable] | None = None,
    ):
        """bias_init: fan_in -> initializer for the two biases (default zeros, as DiT's _basic_init)."""
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.downscale_freq_shift = downscale_freq_shift
        b0 = zeros if bias_init is None else bias_init(frequency_embedding_size)
        b2 = zeros if bias_init is None else bias_init(hidden_size)
        # Sequential indices mirror torch's nn.Sequential(Linear, SiLU, Linear): mlp.0 and mlp.2.
        self.mlp = nnx.Sequential(
            linear(frequency_embedding_size, hidden_size, rngs, dtype=dtype, kernel_init=normal_002, bias_init=b0),
            nnx.silu,
            linear(hidden_size, hidden_size, rngs, dtype=dtype, kernel_init=normal_002, bias_init=b2),
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period, self.downscale_freq_shift)
        return self.mlp(t_freq).astype(jnp.float32)


class LabelEmbedder(nnx.Module):
    """Class labels (B,) -> (B, D), with label dropout to the null class `num_classes` for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nnx.Embed(
            num_classes + use_cfg_embedding,
            hidden_size,
            param_dtype=jnp.float32,
            embedding_init=normal_002,
            rngs=rngs,
        )

    def token_drop(
        self, labels: jax.Array, rng: jax.Array | None = None, force_drop_ids: jax.Array | None = None
    ) -> jax.Array:
        """Replace dropped labels by the null class. `force_drop_ids` (B,) with 1 = drop overrides `rng`."""
        if force_drop_ids is None:
            if rng is None:
                raise ValueError("label dropout in training needs an rng (pass rng=...)")
            drop_ids = jax.random.uniform(rng, labels.shape) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return jnp.where(drop_ids, self.num_classes, labels)

    def __call__(
        self,
        labels: jax.Array,
        train: bool,
        rng: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
    ) -> jax.Array:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, rng, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------------------
# Attention and MLP.
# ----------------------------------------------------------------------------------------------------------
ATTENTION_IMPLS = ("xla", "cudnn", "splash")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """Multi-head scaled dot-product attention, scale 1/sqrt(head_dim).

    q: (B, Tq, H, hd), k and v: (B, Tk, H, hd) -> (B, Tq, H, hd).
    impl "xla": plain einsums with the logits and softmax in float32 (default; runs anywhere).
    impl "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` (NVIDIA GPU, bf16/fp16 only).
    impl "splash": the TPU Pallas kernel under shard_map (dit_jax/models/splash.py; raises off a TPU), "xla" for
    sequences it does not cover.
    """
    if impl == "xla":
        # Heads moved next to the batch first, so both products are canonical batched matmuls (B, H, T, hd):
        # the same dot products, but XLA:CPU runs the (b, h)-major layout ~2.5x faster than contracting across a
        # token-major layout (bench: DiT-S/2, 64 x 256 tokens, 12 blocks: 3.6 s -> 1.3 s on 2 cores).
        scale = 1.0 / math.sqrt(q.shape[-1])
        qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), vh).transpose(0, 2, 1, 3)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if impl == "splash":
        from dit_jax.models.splash import splash_attention, splash_supported

        if splash_supported(q.shape[1], k.shape[1]):
            return splash_attention(q, k, v)
        return attention(q, k, v, "xla")
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")


def check_attention_args(dim: int, num_heads: int, attn_impl: str) -> None:
    if dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
    if attn_impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {attn_impl!r}; expected one of {ATTENTION_IMPLS}")


class Attention(nnx.Module):
    """timm `Attention` with a fused qkv Linear(D, 3D) (q | k | v, each head-major) and an output proj."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        qkv_bias: bool = True,
        dtype: Dtype = None,
        attn_impl: str = "xla",
    ):
        check_attention_args(dim, num_heads, attn_impl)
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = linear(dim, 3 * dim, rngs, dtype=dtype, use_bias=qkv_bias)
        self.proj = linear(dim, dim, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attn_impl)
        return self.proj(out.reshape(b, n, d))


class CrossAttention(nnx.Module):
    """Multi-head cross-attention (the paper's cross-attention block): queries from x, keys/values from c.

    Separate q and fused kv projections, with biases.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = None, attn_impl: str = "xla"):
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.q = linear(dim, dim, rngs, dtype=dtype)
        self.kv = linear(dim, 2 * dim, rngs, dtype=dtype)
        self.proj = linear(dim, dim, rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x: (B, T, D), cond: (B, S, D) -> (B, T, D)."""
        b, n, d = x.shape
        s = cond.shape[1]
        hd = d // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd)
        kv = self.kv(cond).reshape(b, s, 2, self.num_heads, hd)
        out = attention(q, kv[:, :, 0], kv[:, :, 1], self.attn_impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.fc1 = linear(dim, hidden, rngs, dtype=dtype)
        self.fc2 = linear(hidden, dim, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32 (DiT's norm1/norm2/norm_final)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def affine_layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """Standard ViT LayerNorm (scale and bias, eps 1e-6, fp32) for the in-context and cross-attention blocks."""
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens. x: (B, T, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]
