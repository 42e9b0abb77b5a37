"""Independent references for tests/test_inception.py and tests/test_evaluate.py.

* `FIDInceptionTorch`: a compact PyTorch transcription of the FID Inception-v3 as pytorch-fid builds it
  (src/pytorch_fid/inception.py: torchvision's Inception3 trunk with FIDInceptionA / FIDInceptionC /
  FIDInceptionE_1 average pools that exclude the padding, FIDInceptionE_2's max pool, a 1008-way fc), with
  BatchNorm2d(eps=0.001); its state_dict has exactly the layout of pt_inception-2015-12-05-6726825d.pth.
* `resize_tf1_reference`: TF1's legacy bilinear resize (align_corners=False, no half-pixel centres) written as
  two interpolation matrices applied in float64 numpy (only the source coordinate i * (in / out) is a float32
  product, as TF computes it), independent of the gather formulation in dit_jax/models/inception.py.
* `random_inception_state_dict`: random weights in that layout, scaled so that activations stay O(1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv(nn.Module):  # pytorch-fid / torchvision BasicConv2d
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # TF AvgPool SAME: the padding is not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = Conv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg(x)),
        ], 1)


class B(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class C(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            d,
            self.branch_pool(_avg(x)),
        ], 1)


class D(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        t = self.branch3x3_1(x)
        s = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1),
            torch.cat([self.branch3x3dbl_3a(s), self.branch3x3dbl_3b(s)], 1),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionTorch(nn.Module):
    """forward(x (N, 3, 299, 299) already normalised to [-1, 1]) -> (pool (N, 2048), mixed_6/conv (N, 192, 17, 17))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
        self.Mixed_5b = A(192, 32)
        self.Mixed_5c = A(256, 64)
        self.Mixed_5d = A(288, 64)
        self.Mixed_6a = B(288)
        self.Mixed_6b = C(768, 128)
        self.Mixed_6c = C(768, 160)
        self.Mixed_6d = C(768, 160)
        self.Mixed_6e = C(768, 192)
        self.Mixed_7a = D(768)
        self.Mixed_7b = E(1280, max_pool=False)
        self.Mixed_7c = E(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)
        mixed_6_conv = self.Mixed_6d.branch1x1(x)  # TF "mixed_6/conv": the 1x1 branch of Mixed_6d, after ReLU
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1), mixed_6_conv


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in the pytorch-fid layout (plus num_batches_tracked, as torch writes them).

    Conv weights N(0, 2 / fan_in) (He), BN gamma 1 + N(0, 0.1), beta N(0, 0.1), running_mean N(0, 0.1),
    running_var U(0.5, 1.5); fc N(0, 1 / 2048) and bias N(0, 0.1). Every parameter differs from its default,
    so no transposition or naming error can hide behind an identity.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, t in FIDInceptionTorch().state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(0, dtype=np.int64)
        elif name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif name.endswith("bn.weight"):
            out[name] = (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        elif name.endswith("bn.running_var"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name == "fc.weight":
            out[name] = rng.normal(0, np.sqrt(1 / 2048), shape).astype(np.float32)
        else:  # bn.bias, bn.running_mean, fc.bias
            out[name] = (0.1 * rng.normal(size=shape)).astype(np.float32)
    return out


def _interp_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64: row i puts weight 1 - f on floor(s) and f on min(floor(s) + 1, in - 1), where the source
    coordinate s = i * (in / out) is a float32 product of a float32 scale, as in TF's kernel (float in = x * scale)."""
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        s = float(np.float32(i) * scale)
        lo = int(np.floor(s))
        f = s - lo
        m[i, lo] += 1 - f
        m[i, min(lo + 1, in_size - 1)] += f
    return m


def resize_tf1_reference(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, C) -> (N, h, w, C) float64, TF1 ResizeBilinear(align_corners=False) without half-pixel centres."""
    x = np.asarray(images, dtype=np.float64)
    my, mx = _interp_matrix(x.shape[1], size[0]), _interp_matrix(x.shape[2], size[1])
    return np.einsum("ih,nhwc,jw->nijc", my, x, mx, optimize=True)


@torch.no_grad()
def reference_features(state_dict: dict[str, np.ndarray], images: np.ndarray) -> dict[str, np.ndarray]:
    """What the ADM suite reads for uint8 NHWC `images`: pool (N, 2048), spatial (N, 2023), logits (N, 1008)."""
    model = FIDInceptionTorch().eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    x = (resize_tf1_reference(images, (299, 299)) - 128.0) / 128.0
    pool, mixed_6_conv = model(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2))
    spatial = mixed_6_conv.permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)  # NHWC order, as the TF graph
    logits = pool @ model.fc.weight.T  # softmax/logits/MatMul: no bias
    return dict(pool=pool.numpy(), spatial=spatial.numpy(), logits=logits.numpy())
