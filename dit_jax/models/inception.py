"""The FID Inception-v3 (TensorFlow's 2015-12-05 `classify_image_graph_def.pb`) in Flax NNX, NHWC.

This is the network the ADM evaluation suite (openai/guided-diffusion evaluations/evaluator.py) runs: it feeds
uint8 NHWC images as float32 in [0, 255] into the graph at `ExpandDims:0`, and the graph then does

    ResizeBilinear to 299 x 299 (TF1 kernel: align_corners=False and *no* half-pixel centres)
    -> Sub 128 -> Mul 1/128 (0.0078125: exactly (x - 128) / 128)
    -> the Inception-v3 trunk, whose every conv is Conv2D -> BatchNormWithGlobalNormalization (eps 0.001) -> ReLU
    -> pool_3 (8 x 8 average pool, 2048 channels)           = ADM's FID_POOL_NAME "pool_3:0"
    -> softmax/logits/MatMul with softmax/weights (2048, 1008); ADM's Inception Score multiplies by that weight
       matrix alone and never adds softmax/biases (evaluator.py _create_softmax_graph).

Module names follow the torchvision-style tree of pytorch-fid (src/pytorch_fid/inception.py, FIDInception*) and
torch-fidelity (feature_extractor_inceptionv3.py), whose weight file (pt_inception-2015-12-05-6726825d.pth) is
the TF graph's constants renamed, so dit_jax.convert.inception is a renaming plus transposes. The TF graph differs
from torchvision's Inception3 in three places, which both ports patch and we follow:
  * the 3x3 average pools of the pool branches in Mixed_5b-5d, 6b-6e and 7b do not count the zero padding
    (TF AvgPool with SAME padding; torch avg_pool2d(count_include_pad=False));
  * the pool branch of the last block, Mixed_7c, is a 3x3 *max* pool (stride 1, padding 1);
  * the classifier has 1008 outputs.

Spatial features (sFID): ADM reads "mixed_6/conv:0" and keeps channels [:7], flattened in NHWC order:
17 * 17 * 7 = 2023 numbers per image. Which layer that is:
  * the TF graph names its inception blocks mixed, mixed_1, ..., mixed_10; the 35x35 blocks are mixed, mixed_1,
    mixed_2 (Mixed_5b/5c/5d), mixed_3 is the 35->17 reduction (Mixed_6a), mixed_4..mixed_7 are the 17x17 blocks
    (Mixed_6b/6c/6d/6e), mixed_8 the 17->8 reduction (Mixed_7a), mixed_9, mixed_10 the last two (Mixed_7b/7c).
    torch-fidelity's converter (utils/util_convert_inception_weights.py) maps "mixed_6/conv/conv2d_params" and
    "mixed_6/conv/batchnorm" to Mixed_6d.branch1x1.conv / .bn, confirming mixed_6 = Mixed_6d and its un-towered
    "conv" = the 1x1 branch (192 channels at 17 x 17).
  * the graph's op sequence for every conv layer is <name>/Conv2D, <name>/batchnorm (BatchNormWithGlobal-
    Normalization, no activation), <name>/CheckNumerics, <name>/control_dependency, <name> (as listed by e.g.
    the Tensorflex docs' get_graph_ops dump of classify_image_graph_def.pb: "conv/Conv2D", "conv/batchnorm",
    "conv/CheckNumerics", "conv/control_dependency", "conv", "conv_1/conv2d_params", ...). The only op left to
    be the ReLU is the one carrying the bare layer name, so "mixed_6/conv:0" is the *post-ReLU* output of
    Mixed_6d.branch1x1.
So spatial = relu(bn(conv(x)))[..., :7] of Mixed_6d.branch1x1, reshaped (N, 17 * 17 * 7).

Precision: parameters float32; convolutions run in `dtype` (None = float32) with `precision` (default HIGHEST,
so that GPUs do not silently use TF32 for float32 convolutions); batch norm, resize, pooling of the outputs and
the logits are float32. Outputs are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

INPUT_SIZE = 299  # the graph's ResizeBilinear/size
BN_EPS = 1e-3  # BatchNormWithGlobalNormalization variance_epsilon (pytorch-fid: BatchNorm2d(eps=0.001))
NUM_CLASSES = 1008  # softmax/weights is (2048, 1008)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM: spatial = spatial[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


# ----------------------------------------------------------------------------------------------------------
# TF1 bilinear resize.
# ----------------------------------------------------------------------------------------------------------
def tf1_resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, lerp) per output position of TF1's legacy bilinear resize along one axis.

    tensorflow/core/kernels/resize_bilinear_op.cc with align_corners=False, half_pixel_centers=False (the only
    mode in 2015): scale = in_size / out_size in float32 (image_resizer_state.h CalculateResizeScale), source
    position in = out_index * scale in float32, lower = floor(in), upper = min(lower + 1, in_size - 1),
    lerp = in - lower. No half-pixel offset: output pixel 0 samples input pixel 0 exactly. Same as
    torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x(method="slow").
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale  # float32 products, as the kernel
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
    lerp = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, lerp


def resize_bilinear_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 `ResizeBilinear` (align_corners=False, no half-pixel centres) of x (N, H, W, C) -> (N, h, w, C) float32.

    Interpolates as the TF kernel does, in float32:
        top = top_left + (top_right - top_left) * x_lerp
        bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
        out = top + (bottom - top) * y_lerp
    A same-size resize is the identity (every lerp is 0), so it is skipped.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    out_h, out_w = size
    if x.shape[1:3] == (out_h, out_w):
        return x
    ylo, yhi, ylerp = tf1_resize_weights(x.shape[1], out_h)
    xlo, xhi, xlerp = tf1_resize_weights(x.shape[2], out_w)
    top_rows = jnp.take(x, ylo, axis=1)
    bottom_rows = jnp.take(x, yhi, axis=1)
    dx = jnp.asarray(xlerp)[None, None, :, None]
    dy = jnp.asarray(ylerp)[None, :, None, None]
    top = jnp.take(top_rows, xlo, axis=2)
    top = top + (jnp.take(top_rows, xhi, axis=2) - top) * dx
    bottom = jnp.take(bottom_rows, xlo, axis=2)
    bottom = bottom + (jnp.take(bottom_rows, xhi, axis=2) - bottom) * dx
    return top + (bottom - top) * dy


# ----------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------
def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> batch norm with the stored statistics (eps 0.001) -> ReLU; one TF graph layer."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        precision: Any = None,
    ):
        ph, pw = _pair(padding)
        self.dtype = dtype
        self.conv = nnx.Conv(
            cin, cout, kernel_size=_pair(kernel), strides=(stride, stride), padding=((ph, ph), (pw, pw)),
            use_bias=False, dtype=dtype, param_dtype=jnp.float32, precision=precision, rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            cout, use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, H, W, cin) -> (N, H', W', cout)."""
        y = jax.nn.relu(self.bn(self.conv(x).astype(jnp.float32)))
        return y.astype(self.dtype) if self.dtype is not None else y


def _avg_pool_3x3_no_pad_count(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, dividing by the number of real (unpadded) inputs: TF AvgPool SAME."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
    """35 x 35 block (Mixed_5b/5c/5d; TF mixed, mixed_1, mixed_2) with pytorch-fid's FIDInceptionA pool branch."""

    def __init__(self, cin: int, pool_features: int, **kw: Any):
        self.branch1x1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35 -> 17 reduction (Mixed_6a; TF mixed_3)."""

    def __init__(self, cin: int, **kw: Any):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
    """17 x 17 block with factorised 7x7 convolutions (Mixed_6b-6e; TF mixed_4..mixed_7), FIDInceptionC pool."""

    def __init__(self, cin: int, channels_7x7: int, **kw: Any):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """17 -> 8 reduction (Mixed_7a; TF mixed_8)."""

    def __init__(self, cin: int, **kw: Any):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c; TF mixed_9, mixed_10).

    pool="avg": FIDInceptionE_1 (average pool without counting the padding); pool="max": FIDInceptionE_2 (the TF
    graph's last block max-pools its pool branch, 3x3 stride 1 padding 1).
    """

    def __init__(self, cin: int, pool: str, **kw: Any):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(t), self.branch3x3_2b(t)], axis=-1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], axis=-1)
        if self.pool == "avg":
            p = _avg_pool_3x3_no_pad_count(x)
        else:
            p = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        return jnp.concatenate([b1, b3, bd, self.branch_pool(p)], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------------------
class InceptionV3(nnx.Module):
    """The FID Inception-v3. `model(images)` -> dict of float32 features:

        pool     (N, 2048)  pool_3: FID, precision, recall
        spatial  (N, 2023)  mixed_6/conv[..., :7] flattened (17, 17, 7) in NHWC order: sFID
        logits   (N, 1008)  pool @ softmax/weights, no bias: softmax of these is ADM's Inception Score input

    images: (N, H, W, 3), uint8 or float in [0, 255], any H, W (resized to 299 x 299 as the TF graph does).
    dtype: compute dtype of the convolutions (None = float32; anything else changes the metrics slightly).
    precision: jax.lax precision of the convolutions and the logits matmul (default HIGHEST).
    """

    def __init__(self, *, dtype: Dtype = None, precision: Any = jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
        self.dtype = dtype
        self.precision = precision
        kw = dict(rngs=rngs, dtype=dtype, precision=precision)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        # softmax/weights and softmax/biases; the bias is loaded (it is in the weight file) but ADM never uses it.
        self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, param_dtype=jnp.float32, precision=precision, rngs=rngs)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """(N, H, W, 3) in [0, 255] -> (N, 299, 299, 3) in [-1, 1): TF1 resize, then (x - 128) / 128."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (N, H, W, 3), got shape {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) * 0.0078125  # the graph's Sub / Mul; 1/128 is exact, so this equals (x - 128) / 128

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images (N, H, W, 3) uint8 or float [0, 255] -> dict(pool (N, 2048), spatial (N, 2023), logits (N, 1008))."""
        x = self.preprocess(images)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.Conv2d_1a_3x3(x)  # 149 x 149 x 32
        x = self.Conv2d_2a_3x3(x)  # 147 x 147 x 32
        x = self.Conv2d_2b_3x3(x)  # 147 x 147 x 64
        x = _max_pool_3x3_s2(x)  # 73 x 73 x 64
        x = self.Conv2d_3b_1x1(x)  # 73 x 73 x 80
        x = self.Conv2d_4a_3x3(x)  # 71 x 71 x 192
        x = _max_pool_3x3_s2(x)  # 35 x 35 x 192
        x = self.Mixed_5b(x)  # 35 x 35 x 256
        x = self.Mixed_5c(x)  # 35 x 35 x 288
        x = self.Mixed_5d(x)  # 35 x 35 x 288
        x = self.Mixed_6a(x)  # 17 x 17 x 768
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        # "mixed_6/conv:0" = Mixed_6d.branch1x1 after its ReLU (see the module docstring); XLA shares this conv
        # with the identical one inside Mixed_6d.
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS].astype(jnp.float32)  # 17 x 17 x 7
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # 17 x 17 x 768
        x = self.Mixed_7a(x)  # 8 x 8 x 1280
        x = self.Mixed_7b(x)  # 8 x 8 x 2048
        x = self.Mixed_7c(x)  # 8 x 8 x 2048
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool_3: 8 x 8 VALID average pool
        kernel = self.fc.kernel.get_value()
        logits = jnp.matmul(pool, kernel, precision=self.precision)  # softmax/logits/MatMul, no bias (ADM)
        return dict(pool=pool, spatial=spatial.reshape(spatial.shape[0], -1), logits=logits)
