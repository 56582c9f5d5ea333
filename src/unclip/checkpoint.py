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

Reading is weights-only everywhere (`read_checkpoint`): a file that is empty, truncated, random, a safetensors
export where a `.ckpt` is needed, or a pickle that references code is refused with one line naming the file
and what was expected; nothing in it is executed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

STAGES = ("clip", "prior", "decoder", "upsampler")

__all__ = ["STAGES", "CheckpointError", "file_sha256", "read_checkpoint", "load_stage_checkpoint",
           "check_resume_checkpoint", "clip_mismatch", "build_net", "net_state_dict", "export_safetensors"]


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint asked for; the message names the file and what was expected."""


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _check_file(path: Path, expected: str) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected {expected})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected {expected}")


def read_checkpoint(path: str | Path, expected: str = "a checkpoint written by train.py", mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)`, refusing anything else with one line naming the file.

    `expected` completes the message ("expected <expected>"). mmap=True maps the tensors instead of reading
    them (a cheap look at the metadata and shapes). Torch's own advice on a refused pickle is not passed on:
    loading such a file with weights_only=False would run the code it references.
    """
    path = Path(path)
    _check_file(path, expected)
    if _is_safetensors(path):
        raise CheckpointError(f"{path} is a safetensors export (inference weights only); expected {expected}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch.save checkpoint (no zip archive: truncated, or another "
                              f"format); expected {expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, which a weights-only load "
                              f"refuses (nothing in it was run); expected {expected}") from None
    except Exception as err:  # truncated or corrupt members
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: truncated or corrupt); "
                              f"expected {expected}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected {expected}")
    return ckpt


def _read_safetensors(path: Path, expected: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["unclip"]) if "unclip" in header else None
        return {"unclip": meta, "state_dict": load_file(str(path))}
    except (SafetensorError, OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}); "
                              f"expected {expected}") from None


def load_stage_checkpoint(path: str | Path, expected_stage: str | None = None) -> dict[str, Any]:
    """Load a `.ckpt` (weights only) or an exported `.safetensors` and check which stage wrote it.

    Returns a dict with "unclip" (metadata), "state_dict" and "file_sha256". Raises FileNotFoundError for a
    missing file and CheckpointError (a ValueError) for a file that is not a stage checkpoint of this project,
    is the wrong stage, or holds non-finite weights (a diverged run).
    """
    path = Path(path)
    expected = f"a '{expected_stage}' checkpoint" if expected_stage else "a stage checkpoint"
    expected += " of this project (train.py's .ckpt or its .safetensors export)"
    _check_file(path, expected)
    ckpt = _read_safetensors(path, expected) if _is_safetensors(path) else read_checkpoint(path, expected)
    meta = ckpt.get("unclip")
    if not isinstance(meta, dict) or meta.get("stage") not in STAGES or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not an unclip stage checkpoint (no 'unclip' metadata with a stage in {STAGES}); "
            "pass a checkpoint written by `python train.py model=<stage> ...`"
        )
    if expected_stage is not None and meta["stage"] != expected_stage:
        raise CheckpointError(
            f"{path} is a '{meta['stage']}' checkpoint, but a '{expected_stage}' checkpoint is expected here"
        )
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (NaN/inf in {len(bad)} tensors, e.g. {bad[0]}): "
                              "the run that wrote it diverged; use an earlier checkpoint of that run")
    return {"unclip": meta, "state_dict": ckpt["state_dict"], "file_sha256": file_sha256(path)}


def clip_mismatch(recorded: dict[str, Any] | None, identity: dict[str, Any] | None) -> str | None:
    """How a recorded CLIP identity differs from a CLIP encoder's (embedding size, weights hash); None if not."""
    if not recorded or not identity:
        return None
    for key in ("embed_dim", "weights_sha256"):
        if recorded.get(key) != identity.get(key):
            return (f"{key}={recorded.get(key)!r} ({recorded.get('model_name') or 'architecture'}, "
                    f"{recorded.get('pretrained') or recorded.get('checkpoint') or 'random init'}) where this "
                    f"CLIP has {key}={identity.get(key)!r}")
    return None


def _state_mismatch(saved: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> str | None:
    """A one-line summary of how two state dicts differ in keys or shapes; None when they fit."""
    missing, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    reshaped = [k for k in wanted.keys() & saved.keys() if tuple(wanted[k].shape) != tuple(saved[k].shape)]
    parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in
             ((missing, "missing keys"), (unexpected, "unexpected keys"), (sorted(reshaped), "of another shape"))
             if names]
    if reshaped:
        k = sorted(reshaped)[0]
        parts[-1] += f": {tuple(saved[k].shape)} in the file, {tuple(wanted[k].shape)} here"
    return ", ".join(parts) or None


def check_resume_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Check that `path` can resume training `model` (a stage system) before Lightning loads it.

    Weights-only and memory-mapped (tensors are not read). Refused with one line: unreadable files, files of
    another stage, another net shape, another CLIP, or without the training state. Returns the mapped dict.
    """
    stage = getattr(model, "stage", "")
    expected = f"a '{stage}' training checkpoint (a .ckpt train.py wrote)"
    ckpt = read_checkpoint(path, expected, mmap=True)
    meta = ckpt.get("unclip")
    if not isinstance(meta, dict) or "stage" not in meta:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'unclip' metadata); expected {expected}")
    if meta["stage"] != stage:
        raise CheckpointError(f"{path} is a '{meta['stage']}' checkpoint, but this run trains the '{stage}' stage: "
                              f"pass a '{stage}' checkpoint (or resume with model={meta['stage']})")
    absent = [k for k in ("state_dict", "optimizer_states", "loops") if k not in ckpt]
    if absent:
        raise CheckpointError(f"{path} lacks the training state ({', '.join(absent)}); expected {expected}")
    mismatch = _state_mismatch(ckpt.get("current_model_state", ckpt["state_dict"]), model.state_dict())
    if mismatch:
        raise CheckpointError(f"{path} does not fit this run's {stage} model ({mismatch}): resume with the "
                              "config that trained it")
    clip = getattr(getattr(model, "_clip", None), "module", None)
    why = clip_mismatch(meta.get("clip"), getattr(clip, "identity", None)) if stage != "clip" else None
    if why:
        raise CheckpointError(f"{path} was trained with another CLIP ({why}): resume with the clip=... it used")
    return ckpt


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
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a file for sharing gets the usual mode
    tmp.replace(out_path)
    return out_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
