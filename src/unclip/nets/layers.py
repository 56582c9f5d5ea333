"""Layers shared by the unCLIP denoisers: config capture, timestep embedding, attention, MLP, norms.

Every denoiser follows the net contract `net(x_t, t, **cond) -> prediction` (DESIGN.md section 3) and keeps
its constructor arguments in `self.config`, a JSON-serialisable dict, so that a checkpoint can rebuild it
with `cls(**config)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def init_config(init_locals: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a module as a plain dict (ints, floats, bools, str, lists, None).

    Call it first thing in `__init__`, before any other local exists: `self.config = init_config(locals())`.
    Sequences (tuples, Hydra's ListConfig) become lists, so the dict survives JSON and `cls(**config)`.
    """

    def plain(name: str, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Sequence):
            return [plain(name, v) for v in value]
        raise TypeError(
            f"constructor argument {name}={value!r} ({type(value).__name__}) is not JSON-serialisable; "
            "nets take only ints, floats, bools, strings, lists and None so checkpoints can rebuild them"
        )

    return {k: plain(k, v) for k, v in init_locals.items() if k not in ("self", "__class__")}


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: a residual branch then starts as the identity (ADM, 2021)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of `channels` below 32 for small widths."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

    t: (B,) int or float timesteps in [0, 1000). Returns (B, dim) float32, computed in float32 whatever the
    autocast state, because bf16 cannot tell t=998 from t=999 after the frequency multiply.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer SiLU MLP (ADM's `time_embed`)."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, out_dim)


class MLP(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Attention(nn.Module):
    """Multi-head attention over a token sequence, with optional extra context tokens.

    Context tokens (B, S, context_dim) get their own key/value projection and are concatenated ahead of the
    sequence's own keys and values, so queries attend to both at once (GLIDE's "encoder_kv", Nichol et al.
    2021, section 2.3; unCLIP section 2.1 appends four CLIP-image tokens to that context).

    `mask` is a boolean mask broadcastable to (B, heads, T, S + T): True means "may attend". Pass None when
    every key is valid: SDPA then keeps its fastest (flash) kernels.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.context_kv = nn.Linear(context_dim, 2 * dim) if context_dim is not None else None
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = self.project(x)
        if self.context_kv is not None and context is not None:
            B, S, _ = context.shape
            hs = x.shape[-1] // self.heads
            ck, cv = self.context_kv(context).view(B, S, 2, self.heads, hs).permute(2, 0, 3, 1, 4)  # (B, heads, S, hs)
            k = torch.cat([ck, k], dim=2)  # (B, heads, S + T, hs)
            v = torch.cat([cv, v], dim=2)  # (B, heads, S + T, hs)
        return self.attend(q, k, v, mask)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> queries, keys, values, each (B, heads, T, C // heads)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, heads, T, hs) over k, v (B, heads, S, hs), mask broadcastable to (B, heads, T, S) -> (B, T, C)."""
        B, _, T, hs = q.shape
        dropout_p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # CPU SDPA in bf16 is slower than in fp32 (its backward ~3.5x at the demo decoder's shapes, where
            # the bf16 convolutions and matmuls are 2-4x faster; docs/PERFORMANCE.md): attend in fp32 there.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, heads, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.heads * hs)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x (B, T, width); mask as `Attention`'s."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout=dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.mlp(self.ln_2(x))
