"""Independent PyTorch reference for tests/test_dinov2.py: DINOv2 ViT (no registers) and DDT's REPA wrapper.

* `DinoVisionTransformer`: a compact transcription of facebookresearch/dinov2 dinov2/models/vision_transformer.py
  (block_chunks=0, ffn "mlp", LayerScale, qkv/proj/ffn biases, LayerNorm eps 1e-6) with dinov2/layers/*.py, at
  inference. Module names are the official ones, so its state_dict has the keys of dinov2_vitb14_pretrain.pth.
  `interpolate_pos_encoding` keeps the official logic (early return when the table fits a square input; otherwise
  F.interpolate(scale_factor=(w0 + 0.1) / M, bicubic, antialias=False)).
* `resample_abs_pos_embed`: timm/layers/pos_embed.py's function with its defaults (bicubic, antialias=True).
* `DDTDINOv2`: DDT's src/diffusion/stateful_flow_matching/training_repa.py `DINOv2.forward` around a given encoder
  (ImageNet Normalize -> F.interpolate(bicubic) to 224/256 of the size -> timm-resampled pos_embed ->
  forward_features()['x_norm_patchtokens']). NCHW, as torch.
* `random_dinov2_state_dict`: random weights in the official layout, scaled so that activations stay O(1).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _, _, h, w = x.shape
        assert h % self.patch_size == 0 and w % self.patch_size == 0
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, HW, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, depth: int, embed_dim: int, num_heads: int, patch_size: int, img_size: int,
                 mlp_ratio: float = 4.0, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.interpolate_offset = 0.1
        self.interpolate_antialias = False

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        m = int(math.sqrt(n))
        assert n == m * m
        sx, sy = float(w0 + self.interpolate_offset) / m, float(h0 + self.interpolate_offset) / m
        grid = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(sx, sy),
                             mode="bicubic", antialias=self.interpolate_antialias)
        assert (w0, h0) == grid.shape[-2:]
        grid = grid.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos[:, :1], grid), dim=1).to(x.dtype)

    def prepare_tokens(self, x, pos_embed=None):
        _, _, w, h = x.shape  # (sic: the official names)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + (self.interpolate_pos_encoding(x, w, h) if pos_embed is None else pos_embed)

    def forward_features(self, x, pos_embed=None):
        """pos_embed: use this table as it is instead of interpolate_pos_encoding (for non-square inputs, where the
        official path would fail)."""
        x = self.prepare_tokens(x, pos_embed)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x}


def resample_abs_pos_embed(posemb, new_size, num_prefix_tokens: int = 1):
    """timm.layers.pos_embed.resample_abs_pos_embed (interpolation='bicubic', antialias=True, square old grid)."""
    n = posemb.shape[1]
    if new_size[0] * new_size[1] + num_prefix_tokens == n and new_size[0] == new_size[1]:
        return posemb
    hw = int(math.sqrt(n - num_prefix_tokens))
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=list(new_size), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1)


class DDTDINOv2(nn.Module):
    """DDT's REPA wrapper (training_repa.py DINOv2) around an already built encoder."""

    def __init__(self, encoder: DinoVisionTransformer):
        super().__init__()
        self.encoder = encoder
        self.pos_embed = copy.deepcopy(self.encoder.pos_embed)
        self.patch_size = encoder.patch_size

    def fetch_pos(self, h, w):
        return resample_abs_pos_embed(self.pos_embed.data, [h, w])

    def preprocess(self, x):
        _, _, h, w = x.shape
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std  # torchvision Normalize
        return F.interpolate(x, (int(224 * h / 256), int(224 * w / 256)), mode="bicubic")

    @torch.no_grad()
    def forward(self, x):
        x = self.preprocess(x)
        _, _, h, w = x.shape
        pos = self.fetch_pos(h // self.patch_size, w // self.patch_size)
        if h == w:  # DDT: encoder.pos_embed.data = pos; encoder.forward_features(x)
            self.encoder.pos_embed.data = pos
            out = self.encoder.forward_features(x)
            self.encoder.pos_embed.data = self.pos_embed.data
        else:  # the official path would re-interpolate and fail; the resampled table is the intent
            out = self.encoder.forward_features(x, pos_embed=pos)
        return out["x_norm_patchtokens"]


def random_dinov2_state_dict(depth: int, dim: int, patch: int, grid: int, mlp_ratio: float = 4.0,
                             in_chans: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official key layout, scaled to keep the residual stream O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    hidden = int(dim * mlp_ratio)
    sd = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": rnd(1, 1 + grid * grid, dim, std=0.5),
        "mask_token": rnd(1, dim),
        "patch_embed.proj.weight": rnd(dim, in_chans, patch, patch, std=(in_chans * patch * patch) ** -0.5),
        "patch_embed.proj.bias": rnd(dim, std=0.1),
        "norm.weight": rnd(dim, mean=1.0, std=0.2),
        "norm.bias": rnd(dim, std=0.1),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": rnd(dim, mean=1.0, std=0.2),
            p + "norm1.bias": rnd(dim, std=0.1),
            p + "attn.qkv.weight": rnd(3 * dim, dim, std=2.0 * dim ** -0.5),  # peaky enough attention
            p + "attn.qkv.bias": rnd(3 * dim, std=0.1),
            p + "attn.proj.weight": rnd(dim, dim, std=dim ** -0.5),
            p + "attn.proj.bias": rnd(dim, std=0.1),
            p + "ls1.gamma": rnd(dim, mean=0.5, std=0.2),
            p + "norm2.weight": rnd(dim, mean=1.0, std=0.2),
            p + "norm2.bias": rnd(dim, std=0.1),
            p + "mlp.fc1.weight": rnd(hidden, dim, std=dim ** -0.5),
            p + "mlp.fc1.bias": rnd(hidden, std=0.1),
            p + "mlp.fc2.weight": rnd(dim, hidden, std=hidden ** -0.5),
            p + "mlp.fc2.bias": rnd(dim, std=0.1),
            p + "ls2.gamma": rnd(dim, mean=0.5, std=0.2),
        })
    return sd


def build_reference(sd: dict[str, torch.Tensor], depth: int, dim: int, heads: int, patch: int, grid: int,
                    mlp_ratio: float = 4.0) -> DinoVisionTransformer:
    model = DinoVisionTransformer(depth, dim, heads, patch, img_size=grid * patch, mlp_ratio=mlp_ratio)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
