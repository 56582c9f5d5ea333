"""Image tensors <-> files: [-1, 1] float tensors, uint8 arrays, PNG grids (written atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["to_uint8", "save_png", "grid", "save_grid"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-3, -1).numpy()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as PNG via a temporary file, so a crash never leaves half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def grid(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of (N, 3, H, W) images in [-1, 1], each row resized to the first row's size -> uint8 (H', W', 3)."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid

    size = rows[0].shape[-2:]
    n = max(r.shape[0] for r in rows)
    tiles = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[-2:] != size:
            r = F.interpolate(r, size=tuple(size), mode="nearest")
        if r.shape[0] < n:
            r = torch.cat([r, torch.full((n - r.shape[0], *r.shape[1:]), -1.0)])
        tiles.append(r)
    g = make_grid(torch.cat(tiles), nrow=n, padding=pad, pad_value=1.0, value_range=(-1, 1), normalize=False)
    return to_uint8(g)


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    return save_png(grid(rows, pad), path)
