"""Time-conditioned networks ``net(x, t_net, return_features=False)``.

- :class:`UNet`: a small DDPM-style U-Net for images 8x8 up to 64x64 (GroupNorm + SiLU residual
  blocks, sinusoidal time embedding, optional self-attention at the bottleneck). One level per
  entry of ``channel_mults``; the image side is halved between levels (odd sides such as 7 are
  handled by padding the skip connection).
- :class:`MLPDenoiser`: an MLP for 2-D points.

``return_features=True`` also returns the bottleneck features (U-Net: [B, C, h, w] after the middle
block; MLP: the last hidden layer [B, H]): DMD2's GAN classifier head reads them. No BatchNorm, no
dropout by default: a forward pass is a pure function of (parameters, input), vmap-safe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (real-valued) network time, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _gn(c: int) -> nn.GroupNorm:
    g = min(8, c)
    while c % g:
        g -= 1
    return nn.GroupNorm(g, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _gn(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _gn(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, c: int, heads: int = 1):
        super().__init__()
        self.norm, self.qkv, self.proj, self.heads = _gn(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1), heads

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Small U-Net. Defaults (``channels=32, channel_mults=(1, 2), blocks=1``) give ~0.2M parameters
    for 8x8 digits; 28x28 uses e.g. (1, 2, 2), 32x32 (1, 2, 2, 2)."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults=(1, 2), blocks: int = 1,
                 attention: bool = False, dropout: float = 0.0, emb_dim: int | None = None):
        super().__init__()
        emb_dim = emb_dim or 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [channels], channels
        for i, m in enumerate(channel_mults):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(c, channels * m, emb_dim, dropout))
                c = channels * m
                skips.append(c)
            self.down.append(level)
            last = i == len(channel_mults) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim, dropout)
        self.mid_attn = SelfAttention(c) if attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim, dropout)
        self.feature_channels = c
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, m in reversed(list(enumerate(channel_mults))):
            level = nn.ModuleList()
            for _ in range(blocks + 1):
                level.append(ResBlock(c + skips.pop(), channels * m, emb_dim, dropout))
                c = channels * m
            self.up.append(level)
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
        self.out = nn.Sequential(_gn(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, return_features: bool = False):
        t_net = t_net.expand(x.shape[0]) if t_net.ndim == 0 else t_net
        emb = self.time_mlp(timestep_embedding(t_net, self.channels).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample):
            for block in level:
                h = block(h, emb)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        features = h
        for j, (level, up) in enumerate(zip(self.up, self.upsample)):
            for block in level:
                skip = hs.pop()
                if h.shape[-1] != skip.shape[-1] or h.shape[-2] != skip.shape[-2]:
                    h = h[..., : skip.shape[-2], : skip.shape[-1]]
                h = block(torch.cat([h, skip], 1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out(h)
        return (out, features) if return_features else out


class MLPDenoiser(nn.Module):
    """MLP for 2-D points: [x, emb(t_net)] -> hidden x depth (SiLU) -> 2."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        layers, c = [], dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(c, hidden), nn.SiLU()]
            c = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        self.feature_channels = hidden

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, return_features: bool = False):
        t_net = t_net.expand(x.shape[0]) if t_net.ndim == 0 else t_net
        h = self.body(torch.cat([x, timestep_embedding(t_net, self.emb_dim).to(x.dtype)], 1))
        out = self.head(h)
        return (out, h) if return_features else out
