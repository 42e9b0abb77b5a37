"""MCG-NJU/DDT's decoupled_improved_dit.py `DDT`, restated compactly in PyTorch with the reference's module names
(so its state_dict has the released key layout). A numerical reference for the tests, never imported by the
library. RoPE is written with torch complex numbers, as the reference does (view_as_complex on adjacent pairs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Embed(nn.Module):
    def __init__(self, cin, d):
        super().__init__()
        self.proj = nn.Linear(cin, d)

    def forward(self, x):
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    def __init__(self, d, nfreq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(nfreq, d), nn.SiLU(), nn.Linear(d, d))
        self.nfreq = nfreq

    def forward(self, t):
        half = self.nfreq // 2
        freqs = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class LabelEmbedder(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding_table = nn.Embedding(n, d)

    def forward(self, y):
        return self.embedding_table(y)


def rope_cis(hd, h, w, theta=10000.0, scale=16.0):
    xs, ys = torch.linspace(0, scale, w), torch.linspace(0, scale, h)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    freqs = 1.0 / theta ** (torch.arange(0, hd, 4)[: hd // 4].float() / hd)
    xc = torch.polar(torch.ones(h * w, hd // 4), torch.outer(xs.reshape(-1), freqs))
    yc = torch.polar(torch.ones(h * w, hd // 4), torch.outer(ys.reshape(-1), freqs))
    return torch.stack([xc, yc], -1).reshape(h * w, -1)


def rotate(x, cis):  # x (B, N, H, hd)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3).type_as(x)


class RAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(d // heads), RMSNorm(d // heads)
        self.proj = nn.Linear(d, d)

    def forward(self, x, cis):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k = rotate(self.q_norm(q), cis), rotate(self.k_norm(k), cis)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DDTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.attn = RAttention(d, heads)
        self.mlp = FeedForward(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.Linear(d, 6 * d))

    def forward(self, x, c, cis):
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + c1) + s1, cis)
        return x + g2 * self.mlp(self.norm2(x) * (1 + c2) + s2)


class FinalLayer(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class TorchDDT(nn.Module):
    def __init__(self, cin=4, heads=2, d=32, depth=3, enc=2, p=2, classes=10):
        super().__init__()
        self.p, self.d, self.heads, self.depth, self.enc = p, d, heads, depth, enc
        self.x_embedder, self.s_embedder = Embed(cin * p * p, d), Embed(cin * p * p, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(classes + 1, d)
        self.final_layer = FinalLayer(d, cin * p * p)
        self.blocks = nn.ModuleList([DDTBlock(d, heads) for _ in range(depth)])

    def forward(self, x, t, y, s=None):  # x NCHW
        b, _, h, w = x.shape
        cis = rope_cis(self.d // self.heads, h // self.p, w // self.p)
        x = F.unfold(x, kernel_size=self.p, stride=self.p).transpose(1, 2)
        te = self.t_embedder(t).view(b, 1, self.d)
        c = F.silu(te + self.y_embedder(y).view(b, 1, self.d))
        if s is None:
            s = self.s_embedder(x)
            for i in range(self.enc):
                s = self.blocks[i](s, c, cis)
            s = F.silu(te + s)
        x = self.x_embedder(x)
        for i in range(self.enc, self.depth):
            x = self.blocks[i](x, s, cis)
        x = self.final_layer(x, s)
        return F.fold(x.transpose(1, 2).contiguous(), (h, w), kernel_size=self.p, stride=self.p), s
