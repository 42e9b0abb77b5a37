"""The Stable Diffusion VAE (`AutoencoderKL`, "KL-f8") in Flax NNX, NHWC.

A re-implementation of diffusers' AutoencoderKL (diffusers 0.42: models/autoencoders/autoencoder_kl.py,
models/autoencoders/vae.py Encoder / Decoder / DiagonalGaussianDistribution, models/unets/unet_2d_blocks.py
DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D, models/resnet.py ResnetBlock2D,
models/downsampling.py Downsample2D, models/upsampling.py Upsample2D, models/attention_processor.py Attention
with AttnProcessor2_0), written from the diffusers source and checked against it in tests/test_vae.py.

Module and attribute names mirror diffusers' (encoder.down_blocks.{i}.resnets.{j}.conv1, ...,
encoder.mid_block.attentions.0.to_out.0, decoder.up_blocks.{i}.upsamplers.0.conv, quant_conv), so that
dit_jax.convert.diffusers_vae is a renaming of `weight` to `kernel` / `scale` plus transposes.

Numerics (diffusers' defaults for the SD VAE, act_fn "silu", no dropout at inference):
  * ResnetBlock2D: x + conv2(silu(gn2(conv1(silu(gn1(x)))))), with a 1x1 conv_shortcut on x when the channel
    count changes; GroupNorm eps 1e-6 everywhere (resnets, attention, conv_norm_out).
  * Downsample2D (padding=0 in the encoder): pad right and bottom by one (F.pad (0, 1, 0, 1)), then a 3x3
    stride-2 conv without padding. Upsample2D: nearest-neighbour x2, then a 3x3 conv, padding 1.
  * mid-block attention: one head over all H*W positions, head_dim = channels, GroupNorm first, linear
    q/k/v/out with biases, scale 1/sqrt(channels), residual added, rescale_output_factor 1.
  * the decoder's up blocks have layers_per_block + 1 resnets; the last encoder / first decoder level has
    no down / up sampler.
  * encode returns the DiagonalGaussianDistribution moments: (mean, logvar) = chunk(quant_conv(encoder(x)), 2)
    with logvar clipped to [-30, 20].

Precision: parameters are float32; convolutions and linears run in `dtype` (None = float32); GroupNorm and
the attention softmax run in float32; encode returns float32 moments, decode returns `dtype` (float32 when
None).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.constants import SD_VAE_SCALE  # noqa: F401  (re-exported: the caller multiplies / divides)
from dit_jax.models.layers import attention

Dtype = jnp.dtype | type | None

GROUP_NORM_EPS = 1e-6  # diffusers Encoder / Decoder pass resnet_eps=1e-6 and eps=1e-6 to every GroupNorm
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"

# torch's default Conv2d / Linear init (kaiming_uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)), i.e.
# variance_scaling(1/3, fan_in, uniform). Only relevant when training from scratch; checkpoints overwrite it.
torch_like_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nnx.initializers.zeros_init()


def conv(
    cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding=None, dtype: Dtype = None
) -> nnx.Conv:
    """nnx.Conv with bias and fp32 params; padding defaults to kernel // 2 on each side (torch padding=k//2)."""
    if padding is None:
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_like_init,
        bias_init=zeros,
        rngs=rngs,
    )


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=True), computed and returned in float32.

    Groups are contiguous channel ranges, as in torch. Two-pass variance (use_fast_variance=False), as torch.
    """
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=GROUP_NORM_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without a time embedding (temb_channels=None, time_embedding_norm "default")."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.dtype = dtype
        self.norm1 = group_norm(cin, groups, rngs)
        self.conv1 = conv(cin, cout, 3, rngs, dtype=dtype)
        self.norm2 = group_norm(cout, groups, rngs)
        self.conv2 = conv(cout, cout, 3, rngs, dtype=dtype)
        # use_in_shortcut = in_channels != out_channels: a 1x1 conv with bias.
        self.conv_shortcut = conv(cin, cout, 1, rngs, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, cin) -> (B, H, W, cout)."""
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h  # output_scale_factor 1
        return out.astype(self.dtype) if self.dtype is not None else out


class Downsample2D(nnx.Module):
    """diffusers Downsample2D(use_conv=True, padding=0): pad (0, 1, 0, 1) then conv 3x3 stride 2, no padding."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        # Asymmetric padding expressed as the conv's own padding: ((top 0, bottom 1), (left 0, right 1)).
        self.conv = conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """diffusers Upsample2D(use_conv=True): F.interpolate(scale_factor=2, mode="nearest"), then conv 3x3 pad 1."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.conv = conv(channels, channels, 3, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """diffusers Attention as built by UNetMidBlock2D (_from_deprecated_attn_block): one head of width C.

    GroupNorm -> to_q / to_k / to_v (Linear C -> C, bias) -> softmax(q k^T / sqrt(C)) v -> to_out.0 -> + x.
    """

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.dtype = dtype

        def lin() -> nnx.Linear:
            return nnx.Linear(
                channels, channels, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_like_init,
                bias_init=zeros, rngs=rngs,
            )

        self.group_norm = group_norm(channels, groups, rngs)
        self.to_q = lin()
        self.to_k = lin()
        self.to_v = lin()
        self.to_out = nnx.List([lin()])  # diffusers: to_out = [Linear, Dropout]; the dropout has no weights

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (proj(t).reshape(b, h * w, 1, c) for proj in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, "xla").reshape(b, h * w, c)  # fp32 logits and softmax (upcast_softmax)
        out = self.to_out[0](out).reshape(b, h, w, c)
        out = out + x  # residual_connection=True, rescale_output_factor 1
        return out.astype(self.dtype) if self.dtype is not None else out


class UNetMidBlock2D(nnx.Module):
    """resnets.0 -> attentions.0 -> resnets.1 (num_layers 1, add_attention True)."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(
        self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *, rngs: nnx.Rngs,
        dtype: Dtype = None,
    ):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, rngs=rngs, dtype=dtype)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(
        self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *, rngs: nnx.Rngs,
        dtype: Dtype = None,
    ):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs, dtype=dtype)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """diffusers vae.Encoder (double_z=True): conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out (2 * z)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
    ):
        chans = list(block_out_channels)
        self.conv_in = conv(in_channels, chans[0], 3, rngs, dtype=dtype)
        blocks = []
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            blocks.append(
                DownEncoderBlock2D(
                    cin, cout, layers_per_block, groups, add_downsample=i < len(chans) - 1, rngs=rngs, dtype=dtype
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(chans[-1], groups, rngs=rngs, dtype=dtype)
        self.conv_norm_out = group_norm(chans[-1], groups, rngs)
        self.conv_out = conv(chans[-1], 2 * latent_channels, 3, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers vae.Decoder (norm_type "group"): conv_in, mid block, up blocks, GroupNorm-SiLU-conv_out."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
    ):
        rev = list(reversed(block_out_channels))
        self.conv_in = conv(latent_channels, rev[0], 3, rngs, dtype=dtype)
        self.mid_block = UNetMidBlock2D(rev[0], groups, rngs=rngs, dtype=dtype)
        blocks = []
        cout = rev[0]
        for i, c in enumerate(rev):
            cin, cout = cout, c
            blocks.append(
                UpDecoderBlock2D(
                    cin, cout, layers_per_block + 1, groups, add_upsample=i < len(rev) - 1, rngs=rngs, dtype=dtype
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(rev[-1], groups, rngs)
        self.conv_out = conv(rev[-1], out_channels, 3, rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The SD VAE. Defaults are the sd-vae-ft-ema / sd-vae-ft-mse configuration (83.7M parameters).

    encode(x): images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)
        float32, f = 2 ** (len(block_out_channels) - 1) (8 for the SD VAE); logvar clipped to [-30, 20].
    decode(z): unscaled latents (B, h, w, latent_channels) -> images (B, f*h, f*w, out_channels), ~[-1, 1].
    The diffusion model works on SD_VAE_SCALE * z; undo it before decode.
    """

    def __init__(
        self,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        dtype: Dtype = None,
        *,
        rngs: nnx.Rngs = None,
    ):
        if rngs is None:
            rngs = nnx.Rngs(0)
        block_out_channels = tuple(int(c) for c in block_out_channels)
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if not block_out_channels or bad:
            raise ValueError(
                f"every block_out_channels entry must be a multiple of norm_num_groups={norm_num_groups}, got "
                f"{block_out_channels}"
            )
        self.block_out_channels = block_out_channels
        self.layers_per_block = int(layers_per_block)
        self.latent_channels = int(latent_channels)
        self.norm_num_groups = int(norm_num_groups)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.dtype = dtype
        self.scaling_factor = SD_VAE_SCALE  # the folder loader sets the config's value; informational only
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)
        self.encoder = Encoder(
            in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups, rngs=rngs, dtype=dtype
        )
        self.decoder = Decoder(
            latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups, rngs=rngs, dtype=dtype
        )
        self.quant_conv = conv(2 * latent_channels, 2 * latent_channels, 1, rngs, dtype=dtype)
        self.post_quant_conv = conv(latent_channels, latent_channels, 1, rngs, dtype=dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) in [-1, 1] -> posterior (mean, logvar), float32, each (B, H/f, W/f, latent_channels)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"encode expects NHWC images (B, H, W, {self.in_channels}) with H and W multiples of {f}, got "
                f"{x.shape}"
            )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # DiagonalGaussianDistribution: torch.chunk(params, 2, dim=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) unscaled latents -> (B, f*h, f*w, out_channels) images."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"decode expects NHWC latents (B, h, w, {self.latent_channels}), got {z.shape}")
        if self.dtype is not None:
            z = z.astype(self.dtype)
        return self.decoder(self.post_quant_conv(z))

    def sample_latent(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
        """z = mean + exp(logvar / 2) * eps (DiagonalGaussianDistribution.sample), unscaled, float32."""
        eps = jax.random.normal(rng, mean.shape, jnp.float32)
        return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(mean) when rng is None, else decode(a posterior sample)."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else self.sample_latent(mean, logvar, rng)
        return self.decode(z)
