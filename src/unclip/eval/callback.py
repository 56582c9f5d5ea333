"""A fixed evaluation during training: the curves the seed study charts (FID and IS over training), and more.

Every `every_n_validations` validation runs, the decoder or upsampler samples images for the first
`num_samples` validation images (split over ranks) with fixed seeds and the EMA weights (validation is where
Lightning's weight averaging swaps them in), and logs
    val/fid, val/kid_mean, val/is_mean        standard InceptionV3 protocol, when its weights are available
    val/clip_score, val/fd_clip               with the stage's frozen CLIP (decoder)
    val/shapes_<split>_<attribute>            ShapesEval, when the images come from `shapes`
    val/eval_samples                          how many samples the numbers are over
The real-image statistics are computed once and kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from unclip.eval.metrics import ImageMetrics
from unclip.utils.ranks import keys_on_every_rank

log = logging.getLogger(__name__)

__all__ = ["GenerationEval"]


class GenerationEval(pl.Callback):
    """Sample-quality metrics over a fixed validation subset, logged as curves over training.

    Args:
        num_samples: images evaluated per run, across all ranks (FID is biased upwards at small counts: compare
            runs at the same count, and use `evaluate.py` with thousands for reported numbers).
        every_n_validations: run on every n-th validation run.
        metrics: subset of fid, kid, is, clip_score, fd_clip (CLIP metrics need a stage with a CLIP).
        eval_size: images are resized to this before Inception (the usual protocol is 256).
        inception_weights: local path of the Inception weights (default: torch.hub's cache).
        shapes_eval: also read `shapes` attributes back from the samples (when the data has them).
        seed: base seed of the sampling noise.
    """

    def __init__(self, num_samples: int = 256, every_n_validations: int = 1,
                 metrics: Sequence[str] = ("fid", "kid", "is", "clip_score", "fd_clip"), eval_size: int = 256,
                 inception_weights: str | None = None, shapes_eval: bool = True, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.every_n_validations = max(1, every_n_validations)
        self.metric_names = tuple(metrics)
        self.eval_size = eval_size
        self.inception_weights = inception_weights
        self.use_shapes = shapes_eval
        self.seed = seed
        self._metrics: ImageMetrics | None = None
        self._shapes = None
        self._runs = 0
        self._active = False
        self._seen = 0
        self._real_done = False

    def _setup_metrics(self, pl_module: pl.LightningModule) -> None:
        encoder = pl_module._clip.module if hasattr(pl_module, "_clip") else None
        names = [m for m in self.metric_names if encoder is not None or m not in ("clip_score", "fd_clip")]
        self._metrics = ImageMetrics(names, encoder=encoder, eval_size=self.eval_size,
                                     inception_weights=self.inception_weights, device=pl_module.device)
        for name, reason in self._metrics.unavailable.items():
            log.info("val/%s is not computed during training: %s", name, reason)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking or not hasattr(pl_module, "sample_batch"):
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_validations:
            return
        if self._metrics is None:
            self._setup_metrics(pl_module)
        self._metrics.to(pl_module.device)
        self._metrics.reset(real=not self._real_done)
        if self.use_shapes:
            from unclip.eval.shapes_eval import ShapesEval

            self._shapes = ShapesEval()
        self._active, self._seen = True, 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        per_rank = -(-self.num_samples // trainer.world_size)
        if not self._active or self._seen >= per_rank:
            return
        n = min(per_rank - self._seen, len(batch["caption"]))
        sub = {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        base = self.seed + 1_000_000 * trainer.global_rank + self._seen
        with torch.no_grad():
            samples = pl_module.sample_batch(sub, [base + i for i in range(n)])
        self._metrics.update_fake(samples, captions=list(sub["caption"]))
        if not self._real_done:
            self._metrics.update_real(sub["image"])
        metas = sub.get("meta")
        if self._shapes is not None and metas and all(isinstance(m, dict) and "attributes" in m for m in metas):
            self._shapes.update(samples, metas)
        self._seen += n

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._real_done = True
        values = {f"val/{k}": float(v) for k, v in self._metrics.compute().items()}
        if self._shapes is not None:
            scores = self._shapes.compute()
            values.update({f"val/shapes_{k.replace('/', '_')}": float(v) for k, v in scores.items()
                           if isinstance(v, (int, float)) and not k.startswith("n_") and v == v})
        values["val/eval_samples"] = float(self._seen * trainer.world_size)
        # each rank judged its own captions (a relation only where two objects were named): average only the
        # keys every rank has, or the ranks' collectives mismatch
        pl_module.log_dict(keys_on_every_rank(trainer, values), sync_dist=True)
