"""Denoising probe: what a decoder's x_0 prediction keeps of x_t, noise level by noise level.

    python -m unclip.eval.denoise_probe --ckpt <decoder last.ckpt> --shards '<validation shards>/*.tar' [--by-scene]

Noises validation images to fixed timesteps t with fixed noise, asks the decoder (conditioned on each image's
true CLIP embedding and caption, no guidance) for x_0, and reports per t the MSE of that prediction and, on
`shapes` data, ShapesEval of it (judged at --judge-size px after bicubic upsampling, as `evaluate.py` does).

Sampling ends with predictions at small t, where x_t is the image itself but for a little noise: a decoder
whose x_0 loses an attribute there cannot draw it at all, whatever its conditioning says. At large t, x_t
shows almost nothing and the figures are those of the conditioning alone (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unclip.data.shards import read_tar_samples
from unclip.data.transforms import ImageTransform
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import mean_output
from unclip.eval.shapes_eval import ShapesEval

DEFAULT_TIMESTEPS: tuple[int, ...] = (20, 100, 200, 300, 400, 500, 600, 800)


def read_images(pattern: str, image_size: int, limit: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The first `limit` samples (sorted shards and keys) of the shards matching `pattern`: images (N, 3, S, S)
    in [-1, 1] (centre crop, as validation reads them), captions, and the `json` metadata (empty without)."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    transform = ImageTransform(image_size)
    images, captions, metas = [], [], []
    for path in paths:
        samples = read_tar_samples(path)
        for key in sorted(samples):
            sample = samples[key]
            data = sample.get("jpg") or sample.get("png") or sample.get("webp")
            if data is None or "txt" not in sample:
                continue
            images.append(transform(data, random.Random(0))["image"])
            captions.append(sample["txt"].decode("utf-8"))
            metas.append(json.loads(sample["json"]) if "json" in sample else {})
            if len(images) == limit:
                break
        if len(images) == limit:
            break
    if not images:
        raise FileNotFoundError(f"no image-caption samples in {pattern!r}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions, metas


@torch.no_grad()
def denoise_probe(
    net: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    cond: dict[str, Any],
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    metas: Sequence[dict] | None = None,
    judge_size: int = 64,
    batch_size: int = 50,
    seed: int = 0,
) -> list[dict[str, float]]:
    """One row per t: {"t", "snr", "mse" (of x_0 against the images), and with `metas` (the `shapes` attributes)
    "shapes_<split>_<attribute>"}. images (N, C, H, W) in [-1, 1]; cond: the net's conditioning, (N, ...)
    tensors. The same noise for every t."""
    n = images.shape[0]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for tv in timesteps:
        t = torch.full((n,), int(tv), dtype=torch.long)
        x_t = diffusion.q_sample(images, t, noise)
        parts = []
        for i in range(0, n, batch_size):
            part = {k: (v[i:i + batch_size] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
            out = mean_output(net(x_t[i:i + batch_size], t[i:i + batch_size], **part), x_t[i:i + batch_size])
            parts.append(diffusion.predict_x0(x_t[i:i + batch_size], t[i:i + batch_size], out.float()))
        x0 = torch.cat(parts).clamp(-1, 1)
        row = {"t": float(tv), "snr": float(diffusion.snr[int(tv)]), "mse": float((x0 - images).pow(2).mean())}
        if metas is not None and all(m.get("attributes") or m.get("caption") for m in metas):
            side = max(judge_size, x0.shape[-1])
            judged = F.interpolate(x0, size=side, mode="bicubic", align_corners=False).clamp(-1, 1)
            scores = ShapesEval()(judged, [m.get("attributes") or m["caption"] for m in metas])
            row.update({f"shapes_{k.replace('/', '_')}": v for k, v in scores.items() if "/" in k})
        rows.append(row)
    return rows


def scene_group(meta: dict) -> str:
    """A `shapes` sample's scene kind: "objects1_<size>" (one object: small, medium, large) or "objects2"."""
    objects = meta["attributes"]["objects"]
    return f"objects1_{objects[0]['size']}" if len(objects) == 1 else "objects2"


def format_rows(rows: list[dict[str, float]]) -> str:
    """A Markdown table of `denoise_probe` rows."""
    keys = ["t", "snr", "mse"] + sorted({k for r in rows for k in r} - {"t", "snr", "mse", "group"})
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.0f}" if k == "t" else f"{r[k]:.4g}" if k in r else "-"
                                       for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    from unclip.pipeline import UnCLIPPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a decoder checkpoint (train.py's last.ckpt)")
    parser.add_argument("--shards", required=True, help="validation shards (a glob, quoted)")
    parser.add_argument("--t", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS), help="timesteps probed")
    parser.add_argument("--num", type=int, default=200, help="images probed (the first ones, in order)")
    parser.add_argument("--judge-size", type=int, default=64, help="side at which ShapesEval judges")
    parser.add_argument("--clip", default=None,
                        help="the decoder's CLIP checkpoint, where the one its checkpoint records has moved or changed")
    parser.add_argument("--by-scene", action="store_true",
                        help="`shapes` only: one table per scene kind (one object by size, two objects); "
                             "rows get 'group'")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")

    from unclip.checkpoint import CheckpointError
    from unclip.clip.encoder import ClipEncoder

    try:  # a wrong or missing checkpoint, unreadable shards: one line, as train.py / evaluate.py say it
        clip = ClipEncoder(checkpoint=args.clip) if args.clip else None
        pipe = UnCLIPPipeline.from_checkpoints(decoder=args.ckpt, clip=clip, device="cpu", precision="fp32")
        stage = pipe.decoder
        if not all(0 <= t < stage.diffusion.num_timesteps for t in args.t):
            parser.error(f"--t values must lie in [0, {stage.diffusion.num_timesteps})")
        images, captions, metas = read_images(args.shards, stage.net.config["image_size"], args.num)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"denoise_probe: {err}") from None
    text = pipe.clip.encode_text(captions) if stage.meta["system"].get("use_text") else None
    cond = pipe.decoder_cond(pipe.image_embeds(images), text)
    groups = {"all": list(range(len(images)))}
    if args.by_scene:
        if not all(m.get("attributes") for m in metas):
            parser.error("--by-scene needs `shapes` samples (their json's attributes)")
        groups = {}
        for i, meta in enumerate(metas):
            groups.setdefault(scene_group(meta), []).append(i)
    rows = []
    for name, indices in sorted(groups.items()):
        index = torch.tensor(indices)
        part = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
        got = denoise_probe(stage.net, stage.diffusion, images[index], part, args.t, [metas[i] for i in indices],
                            args.judge_size)
        if args.by_scene:
            print(f"\n{name} ({len(indices)} images)")
            got = [{**r, "group": name} for r in got]
        print(format_rows(got))
        rows += got
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
