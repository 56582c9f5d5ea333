"""`evaluate.py`: metrics for any stage checkpoint, or for a whole pipeline, against real image shards.

    clip       zero-shot retrieval recall@1/@5 within groups of 100 distinct captions (+ `shapes` attributes)
    prior      sampled vs true image embeddings: cosine, the text-embedding baseline, unrelated-caption cosine,
               retrieval top-1/top-5 among 100 distinct captions
    decoder    reconstructions from the true image embeddings: FID / KID / IS (Inception), CLIP score and
               FD on CLIP features, cos(CLIP(reconstruction), embedding), ShapesEval on `shapes`
    upsampler  from the downsampled real images: PSNR (and bicubic's), FID / KID / IS, ShapesEval
    pipeline   text-to-image from the validation captions: FID / KID / IS, CLIP score, FD-CLIP, ShapesEval

Every number comes with the sample count and settings in eval.json; eval.md holds the table. On `shapes`,
`<name>_scenes.jsonl` holds one record per judged image (caption, what ShapesEval read, each check), and the
`shapes_objects2_*` breakdown says how two-object scenes fail. Seeds are fixed (sample i uses seed + i), so a
run repeats on the same device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

import unclip
import unclip.config  # noqa: F401
from unclip.checkpoint import load_stage_checkpoint
from unclip.eval.metrics import ImageMetrics
from unclip.eval.report import write_report
from unclip.eval.retrieval import grouped_recall
from unclip.generate import DECODER_DROP, SamplerConfig, sample_image_embeds, sample_images, upsample_images
from unclip.pipeline import LoadedStage, check_clip_identity, clip_from_identity
from unclip.sample import _given, build_pipeline, sampler_overrides, samplers_used
from unclip.systems.prior import embedding_metrics
from unclip.utils.atomic import atomic_write_text
from unclip.utils.images import grid, save_png

log = logging.getLogger(__name__)

__all__ = ["evaluate"]


def _device(cfg: DictConfig) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


def _batches(cfg: DictConfig, image_size: int, lowres_size: int | None, device: torch.device,
             clip_image_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Validation batches of real images (finite: each sample once), at most cfg.num_samples samples.

    With several shard patterns (e.g. `shapes`' in-distribution and held-out splits) the samples are shared
    equally between them, so every split is represented.
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    specs = shard_specs(cfg)
    total = int(cfg.num_samples)
    budgets = [total // len(specs) + (i < total % len(specs)) for i in range(len(specs))]
    with tqdm(total=total, desc="evaluating", unit="img") as bar:
        for spec, budget in zip(specs, budgets):
            data.update(train_shards=None, val_shards=spec, image_size=image_size, lowres_size=lowres_size,
                        clip_image_size=clip_image_size, val_batch_size=int(cfg.batch_size),
                        num_workers=int(cfg.num_workers), resampled=False, random_crop=False, random_flip=False)
            dm = instantiate(data)
            dm.prepare_data()
            dm.setup("validate")
            seen = 0
            for batch in dm.val_dataloader():
                batch = dm.transfer_batch_to_device(dm.on_before_batch_transfer(batch, 0), device, 0)
                n = min(len(batch["caption"]), budget - seen)
                yield {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
                seen += n
                bar.update(n)
                if seen >= budget:
                    break
            counts = dm.skipped_counts()
            if counts:
                log.warning("skipped samples while evaluating %s: %s", spec, counts)


def _autocast(cfg: DictConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _image_metrics(cfg: DictConfig, encoder, device: torch.device) -> ImageMetrics:
    names = [m for m in cfg.metrics if encoder is not None or m not in ("clip_score", "fd_clip")]
    return ImageMetrics(names, encoder=encoder, eval_size=int(cfg.eval_size), inception_weights=cfg.inception_weights,
                        allow_download=bool(cfg.allow_download), seed=int(cfg.seed), device=device)


def _clip_for(cfg: DictConfig, identity: dict | None, stages: list[LoadedStage], device: torch.device):
    if cfg.get("clip"):
        clip = instantiate(cfg.clip)
    elif identity:
        clip = clip_from_identity(identity)
    else:
        return None
    check_clip_identity(clip, stages)
    return clip.to(device)


def shard_specs(cfg: DictConfig) -> list[str]:
    """The real-image shard patterns: `shards=` (one pattern or a list) or else the data config's val_shards."""
    specs = cfg.shards or cfg.data.get("val_shards")
    if not specs:
        raise ValueError("no real images to evaluate against: set shards=... or data.val_shards=...")
    return [str(specs)] if isinstance(specs, str) else list(OmegaConf.to_container(specs, resolve=True))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation the config asks for; writes eval.json / eval.md (and samples.png) to the run dir."""
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.paths.output_dir)
    device = _device(cfg)
    if cfg.get("ckpt"):
        meta = load_stage_checkpoint(cfg.ckpt)["unclip"]
        stage = meta["stage"]
        runner = {"clip": _eval_clip, "prior": _eval_prior, "decoder": _eval_decoder, "upsampler": _eval_upsampler}
        metrics, extra, samples = runner[stage](cfg, device)
        title = f"{stage} checkpoint {cfg.ckpt}"
    elif cfg.pipeline.get("decoder"):
        stage = "pipeline"
        metrics, extra, samples = _eval_pipeline(cfg, device)
        title = "pipeline " + ", ".join(f"{k}={v}" for k, v in cfg.pipeline.items() if v and k in ("prior", "decoder"))
    else:
        raise ValueError("nothing to evaluate: pass ckpt=<stage checkpoint> or pipeline.decoder=<checkpoint> "
                         "(with pipeline.prior=... for text-to-image)")
    scenes = _write_scenes(out_dir, extra.pop("scenes", {}))
    extra = {"stage": stage, "version": unclip.__version__, "seed": int(cfg.seed), "device": str(device),
             "shards": shard_specs(cfg), **extra, **({"shapes_scenes": scenes} if scenes else {})}
    if samples:
        extra["samples_grid"] = str(save_png(grid(samples), out_dir / "samples.png"))
    json_path, md_path = write_report(metrics, out_dir, title, extra)
    _log_to_loggers(cfg, metrics, extra)
    table = "\n".join(f"{k:>24}: {v:.4f}" for k, v in metrics.items())
    return {"metrics": metrics, "json": str(json_path), "markdown": str(md_path), "table": table, "stage": stage}


def _log_to_loggers(cfg: DictConfig, metrics: dict[str, float], extra: dict[str, Any]) -> None:
    from unclip.train import instantiate_group

    for logger in instantiate_group(cfg.get("logger")):
        logger.log_hyperparams({"evaluate": OmegaConf.to_container(cfg, resolve=True)})
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        if hasattr(logger, "log_image") and extra.get("samples_grid"):
            from PIL import Image

            logger.log_image(key="eval/samples", images=[Image.open(extra["samples_grid"])], step=0)
        logger.finalize("success")


def _shapes_eval(batch: dict[str, Any]):
    metas = batch.get("meta")
    if metas and all(isinstance(m, dict) and "attributes" in m for m in metas):
        from unclip.eval.shapes_eval import ShapesEval

        return ShapesEval()
    return None


def _shapes_scores(shapes) -> dict[str, float]:
    """ShapesEval's accuracies and its two-object breakdown as `shapes_<group>_<attribute>` metrics."""
    if shapes is None:
        return {}
    scores = shapes.compute() | shapes.breakdown()
    return {f"shapes_{k.replace('/', '_')}": float(v) for k, v in scores.items()
            if not k.startswith("n_") and isinstance(v, (int, float)) and v == v}


def _write_scenes(out_dir: Path, judged: dict[str, Any]) -> dict[str, str]:
    """Each ShapesEval's per-image records as `<name>_scenes.jsonl` (caption, what was read, the checks):
    the failures behind the accuracies, one line per image, written atomically as the report is. Returns
    {name: path}."""
    paths = {}
    for name, shapes in judged.items():
        if shapes is not None and shapes.scenes:
            path = out_dir / f"{name}_scenes.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(scene) + "\n" for scene in shapes.scenes))
            paths[name] = str(path)
    return paths


# ---------------------------------------------------------------------- stages
def _eval_clip(cfg: DictConfig, device: torch.device):
    from unclip.clip.encoder import ClipEncoder

    clip = ClipEncoder(checkpoint=cfg.ckpt).to(device)
    images, texts, captions, metas = [], [], [], []
    for batch in _batches(cfg, clip.image_size, None, device):
        with torch.no_grad(), _autocast(cfg, device):
            images.append(clip.encode_image(batch["image"]).float())
            texts.append(clip.encode_text(batch["caption"])["text_embed"].float())
        captions += batch["caption"]
        metas += batch.get("meta") or [{}] * len(batch["caption"])
    image, text = torch.cat(images), torch.cat(texts)
    metrics = {}
    for name, (q, k) in {"t2i": (text, image), "i2t": (image, text)}.items():
        metrics.update({f"{name}_r{kk}": v for kk, v in grouped_recall(q, k, captions, (1, 5), 100).items()})
    if metas and all("attributes" in m for m in metas):
        from unclip.eval.zero_shot import shapes_binding, shapes_zero_shot

        metrics.update(shapes_zero_shot(clip, image, metas))
        metrics.update(shapes_binding(clip, image, captions))
    return metrics, {"num_samples": len(captions), "clip": _identity(clip)}, None


def _identity(clip) -> dict[str, Any]:
    return {k: v for k, v in clip.identity.items() if k != "architecture"}


def _eval_prior(cfg: DictConfig, device: torch.device):
    stage = LoadedStage.load(cfg.ckpt, "prior").to(device)
    clip = _clip_for(cfg, stage.meta.get("clip"), [stage], device)
    from unclip.diffusion.embed_norm import EmbedNormalizer

    stats = stage.meta.get("embed_stats") or {}
    normalizer = EmbedNormalizer(stage.net.config["embed_dim"], stage.meta["system"].get("embed_norm", "l2"),
                                 stats.get("mean"), stats.get("std")).to(device)
    sampler = SamplerConfig.from_any(_given(cfg.prior_sampler), **stage.sampler.to_dict())
    n_cand = cfg.num_candidates or stage.meta["system"].get("num_candidates", 2)
    sampled, image, text, captions = [], [], [], []
    for batch in _batches(cfg, clip.image_size, None, device):
        with torch.no_grad(), _autocast(cfg, device):
            fields = ("text_embed", "text_tokens", "text_mask")
            enc = ({k: batch[k] for k in fields} if all(k in batch for k in fields)
                   else clip.encode_text(batch["caption"]))
            true = batch["image_embed"] if "image_embed" in batch else clip.encode_image(batch["image"])
            seeds = [int(cfg.seed) + len(captions) + i for i in range(len(batch["caption"]))]
            out = sample_image_embeds(stage.net, stage.diffusion, normalizer, enc["text_embed"].float(),
                                      enc["text_tokens"].float(), enc["text_mask"], sampler, n_cand, seeds=seeds)
        sampled.append(out.float())
        image.append(F.normalize(true.float(), dim=-1))
        text.append(F.normalize(enc["text_embed"].float(), dim=-1))
        captions += batch["caption"]
    metrics = embedding_metrics(torch.cat(sampled), torch.cat(image), torch.cat(text), captions)
    extra = {"num_samples": len(captions), "sampler": sampler.to_dict(), "num_candidates": n_cand,
             "checkpoint": {"path": stage.path, "sha256": stage.sha256}, "clip": _identity(clip)}
    return metrics, extra, None


def _eval_decoder(cfg: DictConfig, device: torch.device):
    stage = LoadedStage.load(cfg.ckpt, "decoder").to(device)
    clip = _clip_for(cfg, stage.meta.get("clip"), [stage], device)
    size = stage.net.config["image_size"]
    sampler = SamplerConfig.from_any(_given(cfg.decoder_sampler), **stage.sampler.to_dict())
    use_text = stage.meta["system"].get("use_text", False)
    metrics_obj = _image_metrics(cfg, clip, device)
    judge = _judge_size(cfg, size)
    shapes, reference, cosines, shown, n = None, None, [], [], 0
    for batch in _batches(cfg, size, None, device, clip_image_size=clip.image_size):
        b = len(batch["caption"])
        with torch.no_grad(), _autocast(cfg, device):
            embed = batch["image_embed"] if "image_embed" in batch else clip.encode_image(batch["clip_image"])
            cond = {"image_embed": F.normalize(embed.float(), dim=-1)}
            if use_text:
                enc = clip.encode_text(batch["caption"])
                cond.update(text_tokens=enc["text_tokens"].float(), text_mask=enc["text_mask"])
            drops = DECODER_DROP if use_text else DECODER_DROP[:1]
            samples = sample_images(stage.net, stage.diffusion, cond, (b, 3, size, size), sampler, drops,
                                    seeds=[int(cfg.seed) + n + i for i in range(b)])
            recon = F.normalize(clip.encode_image(samples).float(), dim=-1)
        cosines.append((recon * cond["image_embed"]).sum(-1))
        metrics_obj.update_real(batch["image"])
        metrics_obj.update_fake(samples, captions=list(batch["caption"]))
        shapes = shapes or _shapes_eval(batch)
        if shapes is not None:
            shapes.update(_resized(samples, judge), batch["meta"])
            if judge != size:  # the real images through the same resize: the judge's own ceiling there
                reference = reference or _shapes_eval(batch)
                reference.update(_resized(batch["image"].float(), judge), batch["meta"])
        if len(shown) < 2:
            shown += [batch["image"][: cfg.grid_samples], samples[: cfg.grid_samples]]
        n += b
    metrics = {**metrics_obj.compute(), "recon_clip_cosine": float(torch.cat(cosines).mean()), **_shapes_scores(shapes)}
    metrics.update({k.replace("shapes_", "shapes_real_"): v for k, v in _shapes_scores(reference).items()})
    extra = {"num_samples": n, "sampler": sampler.to_dict(), **metrics_obj.metadata(), "shapes_judge_size": judge,
             "checkpoint": {"path": stage.path, "sha256": stage.sha256}, "clip": _identity(clip),
             "scenes": {"shapes": shapes, "shapes_real": reference}}
    return metrics, extra, shown


def _judge_size(cfg: DictConfig, size: int) -> int:
    """The side at which ShapesEval reads the decoder's samples: its own size unless `shapes_judge_size`."""
    judge = cfg.get("shapes_judge_size")
    if judge is None:
        return size
    if not isinstance(judge, int) or isinstance(judge, bool) or judge < size:
        raise ValueError(f"shapes_judge_size={judge!r}: expected null or an integer side >= the decoder's {size} px")
    return judge


def _resized(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images (B, 3, h, w) in [-1, 1], bicubic-resized to (side, side) unless already that size."""
    from unclip.systems.image import bicubic_upsample

    return images if images.shape[-1] == side else bicubic_upsample(images, side)


def _eval_upsampler(cfg: DictConfig, device: torch.device):
    from unclip.systems.image import bicubic_upsample, psnr

    stage = LoadedStage.load(cfg.ckpt, "upsampler").to(device)
    system = stage.meta["system"]
    size, low = stage.net.config["image_size"], int(system["lowres_size"])
    sampler = SamplerConfig.from_any(_given(cfg.upsampler_samplers[0]) if cfg.upsampler_samplers else {},
                                     **stage.sampler.to_dict())
    clip = instantiate(cfg.clip).to(device) if cfg.get("clip") else None
    metrics_obj = _image_metrics(cfg, clip, device)
    shapes, ours, bicubic, shown, n = None, [], [], [], 0
    for batch in _batches(cfg, size, low, device):
        b = len(batch["caption"])
        lowres = batch["lowres_image"].float()
        seeds = [int(cfg.seed) + n + i for i in range(b)]
        level = int(system.get("sample_noise_level", 0)) if stage.net.config.get("noise_level_cond") else None
        with torch.no_grad(), _autocast(cfg, device):
            samples = upsample_images(stage.net, stage.diffusion, lowres, size, sampler, level,
                                      residual=bool(system.get("residual", False)), seeds=seeds)
        real = batch["image"].float()
        base = bicubic_upsample(lowres, size)
        ours.append(psnr(samples, real))
        bicubic.append(psnr(base, real))
        metrics_obj.update_real(real)
        metrics_obj.update_fake(samples, captions=list(batch["caption"]))
        shapes = shapes or _shapes_eval(batch)
        if shapes is not None:
            shapes.update(samples, batch["meta"])
        if len(shown) < 3:
            shown += [base[: cfg.grid_samples], samples[: cfg.grid_samples], real[: cfg.grid_samples]]
        n += b
    metrics = {**metrics_obj.compute(), "psnr": float(torch.cat(ours).mean()),
               "psnr_bicubic": float(torch.cat(bicubic).mean()), **_shapes_scores(shapes)}
    metrics["psnr_gain_db"] = metrics["psnr"] - metrics["psnr_bicubic"]
    extra = {"num_samples": n, "sampler": sampler.to_dict(), "lowres_size": low, **metrics_obj.metadata(),
             "checkpoint": {"path": stage.path, "sha256": stage.sha256}, "scenes": {"shapes": shapes}}
    return metrics, extra, shown


def _eval_pipeline(cfg: DictConfig, device: torch.device):
    with open_dict(cfg):
        cfg.pipeline.device = str(device)
    pipe = build_pipeline(cfg)
    if pipe.prior is None:
        raise ValueError("text-to-image evaluation needs pipeline.prior=<prior checkpoint>")
    final = pipe.upsamplers[-1] if pipe.upsamplers else pipe.decoder
    size = final.net.config["image_size"]
    metrics_obj = _image_metrics(cfg, pipe.clip, device)
    overrides = sampler_overrides(cfg)
    shapes, shapes_64, shown, n = None, None, [], 0
    for batch in _batches(cfg, size, None, device):
        b = len(batch["caption"])
        out = pipe.text_to_image(batch["caption"], [int(cfg.seed) + n + i for i in range(b)],
                                 **overrides, num_candidates=cfg.num_candidates, batch_size=int(cfg.batch_size))
        samples = out["images"].to(device)
        metrics_obj.update_real(batch["image"])
        metrics_obj.update_fake(samples, captions=list(batch["caption"]))
        shapes = shapes or _shapes_eval(batch)
        if shapes is not None:
            shapes.update(samples, batch["meta"])
            if final is not pipe.decoder:  # the decoder's own 64 px output is judged too
                shapes_64 = shapes_64 or _shapes_eval(batch)
                shapes_64.update(out["decoder"], batch["meta"])
        if len(shown) < 2:
            shown += [batch["image"][: cfg.grid_samples], samples[: cfg.grid_samples]]
        n += b
    metrics = {**metrics_obj.compute(), **_shapes_scores(shapes)}
    metrics.update({k.replace("shapes_", "shapes_decoder_"): v for k, v in _shapes_scores(shapes_64).items()})
    extra = {"num_samples": n, **metrics_obj.metadata(), "checkpoints": pipe.checkpoint_hashes(),
             "clip": _identity(pipe.clip),
             "samplers": samplers_used(pipe, overrides), "scenes": {"shapes": shapes, "shapes_decoder": shapes_64}}
    return metrics, extra, shown
