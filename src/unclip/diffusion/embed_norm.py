"""How the prior's diffusion space is scaled from CLIP image embeddings (and back).

CLIP image embeddings are compared by cosine, so the prior works on the unit sphere's direction:

    "l2"           x_0 = sqrt(D) * e / |e|            per-dimension variance ~1, like the noise (the scaling
                                                      the public peer uses for its x_0-predicting prior)
    "standardize"  x_0 = (e / |e| - mean) / std       per-dimension statistics of the unit embeddings,
                                                      measured over the data by the embedding precompute
Decoding returns unit vectors: e_hat = normalize(decode(x_0)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbedNormalizer"]


class EmbedNormalizer(nn.Module):
    """Maps CLIP image embeddings (B, D) to the prior's diffusion space and back."""

    def __init__(self, embed_dim: int, mode: Literal["l2", "standardize"] = "l2",
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        if mode not in ("l2", "standardize"):
            raise ValueError(f"embed_norm must be 'l2' or 'standardize', got {mode!r}")
        if mode == "standardize" and (mean is None or std is None):
            raise ValueError(
                "embed_norm='standardize' needs the image-embedding statistics: pass embed_stats=PATH to the "
                "embed_stats.json written by `python -m unclip.data.embed`"
            )
        if mean is not None and (len(mean) != embed_dim or len(std) != embed_dim):
            raise ValueError(f"embedding statistics have {len(mean)} dims, the prior expects {embed_dim}")
        self.mode, self.embed_dim = mode, embed_dim
        self.register_buffer("mean", torch.tensor(mean or [0.0] * embed_dim), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * embed_dim).clamp(min=1e-6), persistent=False)

    def encode(self, image_embed: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(image_embed.float(), dim=-1)
        if self.mode == "l2":
            return unit * math.sqrt(self.embed_dim)
        return (unit - self.mean) / self.std

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.float()
        if self.mode == "standardize":
            x0 = x0 * self.std + self.mean
        return F.normalize(x0, dim=-1)

    def stats(self) -> dict[str, list[float]] | None:
        if self.mode == "l2":
            return None
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}
