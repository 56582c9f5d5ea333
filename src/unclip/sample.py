"""`sample.py`: prompts (or images) -> UnCLIPPipeline -> PNGs with JSON sidecars and a grid.

File names come from prompts but are sanitised: only letters, digits, '-', '_' and '.', no leading dots,
bounded length, prefixed with the image index, and resolved to stay inside the output folder.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import unclip
import unclip.config  # noqa: F401
from unclip.pipeline import UnCLIPPipeline
from unclip.utils.images import grid, save_png, to_uint8

log = logging.getLogger(__name__)

__all__ = ["sample", "safe_filename", "read_prompts", "load_image", "build_pipeline"]

MAX_FILENAME_CHARS = 200  # + "NNNN_" and ".json": within the 255 bytes most file systems allow


def safe_filename(text: str, index: int, max_chars: int = 80, suffix: str = ".png") -> str:
    """`NNNN_<sanitised text><suffix>`: no separators, control characters or leading dots; bounded length."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text)
    text = re.sub(r"[_.]{2,}", "_", text).strip("._-")[:max_chars].rstrip("._-") or "image"
    return f"{index:04d}_{text}{suffix}"


def safe_path(out_dir: Path, name: str) -> Path:
    path = (out_dir / name).resolve()
    if not path.is_relative_to(out_dir.resolve()):
        raise ValueError(f"refusing to write outside {out_dir}: {name!r}")
    return path


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from `prompt`, `prompts` and `prompts_file` (blank lines skipped); errors name the bad one."""
    prompts: list[str] = []
    if cfg.get("prompt") is not None:
        prompts.append(str(cfg.prompt))
    prompts += [str(p) for p in cfg.get("prompts") or []]
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file)
        if path.is_dir():
            raise ValueError(f"prompts_file={path} is a directory; pass a text file with one prompt per line")
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompts_file={path} is not UTF-8 text (byte {err.start} cannot be decoded); pass a "
                             "text file with one prompt per line") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: give every prompt some text")
    return prompts


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file -> (3, H, W) in [-1, 1], optionally resized (shorter side) and center-cropped to size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = Image.open(path).convert("RGB")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    if size is not None:
        h, w = x.shape[-2:]
        s = size / min(h, w)
        x = F.interpolate(x[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          antialias=True, align_corners=False)[0]
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[:, top:top + size, left:left + size].clamp(-1, 1)
    return x


def build_pipeline(cfg: DictConfig) -> UnCLIPPipeline:
    p = cfg.pipeline
    if not p.get("decoder"):
        raise ValueError("pass the decoder checkpoint: pipeline.decoder=PATH (and pipeline.prior=PATH for text)")
    clip = instantiate(p.clip) if p.get("clip") else None
    return UnCLIPPipeline.from_checkpoints(
        decoder=p.decoder, prior=p.get("prior"), upsamplers=list(p.get("upsamplers") or []), clip=clip,
        device=p.get("device", "auto"), precision=p.get("precision", "auto"), offload=p.get("offload", False),
        compile=p.get("compile", False),
    )


def _sidecar(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run one sampling job; returns {"files": [...], "grid": path, "out_dir": path}."""
    max_chars = cfg.max_filename_chars
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or not 1 <= max_chars <= MAX_FILENAME_CHARS:
        raise ValueError(f"max_filename_chars={max_chars!r}: pass an integer from 1 to {MAX_FILENAME_CHARS} (file "
                         "names also carry an index and a suffix, within the file system's 255 bytes)")
    prompts = read_prompts(cfg) if cfg.mode == "text" else []  # bad prompts fail before any checkpoint loads
    if cfg.mode == "text" and not prompts:
        raise ValueError("no prompts: pass prompt=..., prompts=[...] or prompts_file=PATH")
    out_dir = Path(cfg.paths.output_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(cfg)
    common = {
        "version": unclip.__version__, "mode": cfg.mode, "device": str(pipe.device), "precision": pipe.precision,
        "checkpoints": {s.name: {"path": s.path, "sha256": s.sha256}
                        for s in (pipe.prior, pipe.decoder, *pipe.upsamplers) if s is not None},
        "clip": {k: v for k, v in pipe.clip.identity.items() if k != "architecture"},
    }
    if cfg.mode == "text":
        return _text_to_image(cfg, prompts, pipe, images_dir, out_dir, common)
    return _manipulation(cfg, pipe, images_dir, out_dir, common)


def _text_to_image(cfg, prompts: list[str], pipe: UnCLIPPipeline, images_dir: Path, out_dir: Path,
                   common: dict) -> dict[str, Any]:
    expanded = [p for p in prompts for _ in range(int(cfg.num_images_per_prompt))]
    seeds = [int(cfg.seed) + i for i in range(len(expanded))]
    truncated = pipe.clip.truncated(expanded)
    for i, (p, cut) in enumerate(zip(prompts, pipe.clip.truncated(prompts))):
        if cut:
            log.warning("prompt %d is longer than CLIP's %d-token context and is truncated: %r", i,
                        pipe.clip.context_length, p[:80] + ("..." if len(p) > 80 else ""))
    overrides = sampler_overrides(cfg)
    settings = {**overrides, "num_candidates": cfg.num_candidates, "stop_at": cfg.stop_at}
    result = pipe.text_to_image(expanded, seeds, **settings, batch_size=int(cfg.batch_size), progress=True)
    samplers = samplers_used(pipe, overrides)
    files = []
    images = result.get("images")
    if images is not None and not torch.isfinite(images).all():
        bad = sorted({i for i in range(len(expanded)) if not torch.isfinite(images[i]).all()})
        log.warning("images %s have non-finite pixels (written as black): the checkpoints or the precision "
                    "produce NaN/inf; try pipeline.precision=fp32", bad)
    for i, prompt in enumerate(expanded):
        record = {**common, "prompt": prompt, "seed": seeds[i], "index": i, "truncated": truncated[i],
                  "settings": {**settings, "samplers": samplers}}
        name = safe_filename(prompt, i, int(cfg.max_filename_chars), suffix="")
        if images is not None:
            path = save_png(to_uint8(images[i]), safe_path(images_dir, name + ".png"))
            record["image"] = path.name
            files.append(path)
        record["image_embed"] = result["image_embed"][i].tolist() if cfg.stop_at == "prior" else None
        _sidecar(safe_path(images_dir, name + ".json"), record)
    grid_path = save_png(grid([images]), out_dir / "grid.png") if images is not None else None
    log.info("wrote %d images to %s (grid: %s)", len(files), images_dir, grid_path)
    return {"files": [str(f) for f in files], "grid": str(grid_path) if grid_path else None, "out_dir": str(out_dir)}


def _given(node) -> dict[str, Any]:
    """The sampler keys set on the command line (nulls mean: the checkpoint's default)."""
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return {k: v for k, v in (values or {}).items() if v is not None}


def sampler_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The `prior_sampler`, `decoder_sampler` and `upsampler_samplers` keys set on the command line, as
    `UnCLIPPipeline.text_to_image` / `resolve_samplers` take them."""
    return {"prior_sampler": _given(cfg.prior_sampler), "decoder_sampler": _given(cfg.decoder_sampler),
            "upsampler_samplers": [_given(u) for u in cfg.upsampler_samplers or []]}


def samplers_used(pipe: UnCLIPPipeline, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each stage's sampler settings as it draws with `overrides` (of `sampler_overrides`), for a JSON record."""
    return {stage: sampler.to_dict() for stage, sampler in pipe.resolve_samplers(**overrides).items()}


def _input(value: str, pipe: UnCLIPPipeline) -> torch.Tensor | str:
    """An interpolation end: an existing image file, else a prompt."""
    return load_image(value, pipe.clip.image_size) if Path(value).is_file() else value


def _manipulation(cfg, pipe: UnCLIPPipeline, images_dir: Path, out_dir: Path, common: dict) -> dict[str, Any]:
    files, rows, records = [], [], []
    # the manipulations decode with DDIM; steps and guidance from decoder_sampler (else the decoder's defaults;
    # text diffs default to guidance 1, like the inversion they start from)
    given = _given(cfg.decoder_sampler)
    unused = sorted(set(given) - {"num_steps", "cond_scale"})
    if unused:
        raise ValueError(f"mode={cfg.mode} decodes with DDIM from image embeddings alone (no caption tokens): of "
                         f"decoder_sampler it takes num_steps and cond_scale; unset decoder_sampler.{unused[0]}")
    prior_given = _given(cfg.prior_sampler)
    if cfg.mode != "interpolate" and (prior_given or cfg.num_candidates is not None):
        raise ValueError(f"mode={cfg.mode} does not run the prior: unset prior_sampler and num_candidates")
    steps, scale = given.get("num_steps"), given.get("cond_scale")
    default_scale = 1.0 if cfg.mode == "text_diff" else pipe.decoder.sampler.cond_scale
    decoder_sampler = {"name": "ddim", "num_steps": steps or pipe.decoder.sampler.num_steps,
                       "cond_scale": default_scale if scale is None else scale}
    settings = {"decoder_sampler": decoder_sampler}
    if cfg.mode == "variations":
        if not cfg.images:
            raise ValueError("variations need input images: images=[path, ...]")
        size = pipe.decoder.net.config["image_size"]
        src = torch.stack([load_image(p, max(size, pipe.clip.image_size)) for p in cfg.images])
        out = pipe.variations(src, int(cfg.variations.num), seed=int(cfg.seed), eta=float(cfg.variations.eta),
                              invert=bool(cfg.variations.invert), num_steps=steps, cond_scale=scale, progress=True)
        for i, path in enumerate(cfg.images):
            rows.append(torch.cat([F.interpolate(src[i:i + 1], size=(size, size), mode="area"), out[i]]))
            for j in range(out.shape[1]):
                records.append((f"{Path(path).stem}_var{j}", out[i, j], {
                    "source": str(path), "variation": j, "decoder_seed": int(cfg.seed) + 7919 * j + i,
                    "eta": float(cfg.variations.eta), "invert": bool(cfg.variations.invert)}))
    elif cfg.mode == "interpolate":
        start, end = cfg.interpolate.start, cfg.interpolate.end
        if not start or not end:
            raise ValueError("interpolation needs interpolate.start and interpolate.end (prompts or image files)")
        ends = [_input(start, pipe), _input(end, pipe)]
        prior_sampler = num_candidates = None
        if pipe.prior is not None and any(isinstance(e, str) for e in ends):  # a prompt end is the prior's draw
            prior_sampler = pipe.resolve_samplers(prior_sampler=prior_given)["prior"]
            num_candidates = cfg.num_candidates or pipe.prior.meta["system"].get("num_candidates", 2)
            settings.update(prior_sampler=prior_sampler.to_dict(), num_candidates=int(num_candidates))
        out = pipe.interpolate(*ends, int(cfg.interpolate.num_frames), seed=int(cfg.seed), num_steps=steps,
                               cond_scale=scale, progress=True, prior_sampler=prior_sampler,
                               num_candidates=num_candidates)
        rows.append(out["images"])
        for j, img in enumerate(out["images"]):
            records.append((f"frame{j:02d}", img, {"start": start, "end": end, "frame": j}))
    elif cfg.mode == "text_diff":
        td = cfg.text_diff
        if not (td.image and td.source and td.target):
            raise ValueError("text diffs need text_diff.image, text_diff.source and text_diff.target")
        image = load_image(td.image, max(pipe.decoder.net.config["image_size"], pipe.clip.image_size))
        out = pipe.text_diff(image, td.source, td.target, list(td.thetas), num_steps=steps, cond_scale=scale,
                             progress=True)
        rows.append(out["images"])
        for theta, img in zip(td.thetas, out["images"]):
            records.append((f"theta{theta:.2f}", img, {"image": td.image, "source": td.source, "target": td.target,
                                                      "theta": float(theta)}))
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}: text, variations, interpolate or text_diff")
    for i, (name, img, extra) in enumerate(records):
        fname = safe_filename(name, i, int(cfg.max_filename_chars), suffix="")
        path = save_png(to_uint8(img), safe_path(images_dir, fname + ".png"))
        record = {**common, **extra, "seed": int(cfg.seed), "image": path.name, **settings}
        _sidecar(safe_path(images_dir, fname + ".json"), record)
        files.append(path)
    grid_path = save_png(grid(rows), out_dir / "grid.png")
    log.info("wrote %d images to %s (grid: %s)", len(files), images_dir, grid_path)
    return {"files": [str(f) for f in files], "grid": str(grid_path), "out_dir": str(out_dir)}
