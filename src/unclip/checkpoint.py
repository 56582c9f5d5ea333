"""Self-describing stage checkpoints: strict, weights-only loading and a safetensors export.

Every stage writes `checkpoint["unclip"]` (plain types only, so `torch.load(weights_only=True)` reads it):

    stage        "clip" | "prior" | "decoder" | "upsampler"
    version      the project version that wrote it
    net          {"class": import path, "config": constructor kwargs}   (not for "clip")
    diffusion    the diffusion settings the net was trained with       (not for "clip")
    clip         the CLIP identity the stage was trained against (for "clip": how to rebuild it)
    embed_stats  embedding statistics the stage normalises with (prior), else None
    system       the system's own hyperparameters (conditioning, drop probabilities, sampling defaults)

`checkpoint["state_dict"]` holds the EMA weights when EMA was on (Lightning's weight averaging swaps them in),
so inference uses them without further work.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch

STAGES = ("clip", "prior", "decoder", "upsampler")

__all__ = ["STAGES", "file_sha256", "load_stage_checkpoint", "build_net", "net_state_dict", "export_safetensors"]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_stage_checkpoint(path: str | Path, expected_stage: str | None = None) -> dict[str, Any]:
    """Load a `.ckpt` (weights only) or an exported `.safetensors` and check which stage wrote it.

    Returns a dict with "unclip" (metadata), "state_dict" and "file_sha256". Raises FileNotFoundError for a
    missing file and ValueError for a file that is not a stage checkpoint of this project or is the wrong stage.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["unclip"]) if "unclip" in header else None
        ckpt = {"unclip": meta, "state_dict": load_file(str(path))}
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors, truncated files, foreign formats
            raise ValueError(f"{path} is not a readable checkpoint (weights-only load failed: {err})") from err
    meta = ckpt.get("unclip") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("stage") not in STAGES:
        raise ValueError(
            f"{path} is not an unclip stage checkpoint (no 'unclip' metadata with a stage in {STAGES}); "
            "pass a checkpoint written by `python train.py model=<stage> ...`"
        )
    if expected_stage is not None and meta["stage"] != expected_stage:
        raise ValueError(
            f"{path} is a '{meta['stage']}' checkpoint, but a '{expected_stage}' checkpoint is expected here"
        )
    return {"unclip": meta, "state_dict": ckpt["state_dict"], "file_sha256": file_sha256(path)}


def build_net(net_meta: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a net from {"class": "pkg.module.Class", "config": {...}} (only classes inside this package)."""
    module_name, _, class_name = net_meta["class"].rpartition(".")
    if not module_name.startswith("unclip."):
        raise ValueError(f"refusing to build {net_meta['class']!r}: nets must come from the unclip package")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**net_meta["config"])


def net_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The net's own weights from a system state dict (keys under `prefix`, prefix removed)."""
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no weights under {prefix!r} in this checkpoint")
    return out


def export_safetensors(ckpt_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write a stage checkpoint's inference weights (EMA when trained with it) and metadata as safetensors."""
    from safetensors.torch import save_file

    ckpt = load_stage_checkpoint(ckpt_path)
    out_path = Path(out_path) if out_path else Path(ckpt_path).with_suffix(".safetensors")
    tensors = {k: v.detach().clone().contiguous() for k, v in ckpt["state_dict"].items()}  # no shared storage
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"unclip": json.dumps(ckpt["unclip"])})
    tmp.replace(out_path)
    return out_path
