"""The official DiT (facebookresearch/DiT models.py), restated compactly in PyTorch with the official module
names, so that its state_dict has exactly the official keys and layout. timm's PatchEmbed / Attention / Mlp
are written out (timm is not a dependency); the maths follows models.py line by line. Shared by the
converter and sampling tests (a numerical reference) and by the benchmark's PyTorch reference
(bench/torch_reference.py imports this file by path); never imported by the library.

Two options exist for the benchmark and default to the tests' exact behaviour: `fused_attn` (timm >= 0.9's
Attention calls torch's scaled_dot_product_attention unless TIMM_FUSED_ATTN=0; the tests use timm's explicit
softmax(q k^T) v path) and `class_dropout_prob` (the official LabelEmbedder drops labels to the null class with
this probability in training mode; 0 here unless asked)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def official_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """models.py get_2d_sincos_pos_embed (from MAE): w-first meshgrid, [emb(grid[0]) | emb(grid[1])]."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, p, c, d):
        super().__init__()
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, d, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))
        self.freq = freq

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs.to(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # a no-op for the official fp32 model


class LabelEmbedder(nn.Module):
    def __init__(self, n, d, dropout_prob=0.0):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, d)
        self.num_classes, self.dropout_prob = n, dropout_prob

    def forward(self, y, train=False):
        if train and self.dropout_prob > 0:  # models.py token_drop: the null class with prob dropout_prob
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class Attention(nn.Module):  # timm Attention(qkv_bias=True)
    def __init__(self, d, heads, fused=False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:  # timm >= 0.9's default (fused_attn)
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):  # timm Mlp with GELU(tanh)
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d, heads, fused_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads, fused_attn)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, d, p, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class OfficialDiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                 num_classes=10, learn_sigma=True, class_dropout_prob=0.0, fused_attn=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.p = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        table = torch.from_numpy(official_sincos_2d(hidden_size, grid)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, fused_attn) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        n, c_, p = x.shape[0], self.out_channels, self.p
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, h, w, p, p, c_))
        return x.reshape(n, c_, h * p, w * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


@torch.no_grad()
def randomize_torch(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random and O(1)-preserving, including the ones the official init zeroes; pos_embed gets
    the exact table plus a small drift, as EMA'd releases have (so as-is loading is visible)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
            continue
        std = 1.0 if name.endswith("embedding_table.weight") else (
            1.0 / math.sqrt(np.prod(p.shape[1:])) if p.ndim >= 2 else 0.1
        )
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def numpy_sd(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
