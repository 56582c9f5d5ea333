"""Callbacks Lightning lacks: EMA with warm-up, and logging of the data layer's skip counts."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMA", "DataStatsLogger", "batch_size"]


class _EMAModel(AveragedModel):
    """AveragedModel whose update is one fused pass with the decay computed on the device (no host sync)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool, device=None) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        floats = [(a, c.detach().to(a.device)) for a, c in zip(ours, theirs) if a.is_floating_point()]
        for a, c in zip(ours, theirs):
            if not a.is_floating_point():
                a.copy_(c)
        n = self.n_averaged.float()
        decay = torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        decay = torch.where(n == 0, torch.zeros_like(decay), decay)  # the first update copies
        if floats:
            avg, cur = [a for a, _ in floats], [c for _, c in floats]
            torch._foreach_mul_(avg, decay)
            torch._foreach_add_(avg, torch._foreach_mul(cur, 1 - decay))
        self.n_averaged += 1


class EMA(WeightAveraging):
    """Exponential moving average of the weights, used for validation, sampling and the saved checkpoint.

    Lightning's weight averaging swaps the averaged weights in for validation and writes them as the
    checkpoint's `state_dict` (the training weights go to `current_model_state`, so resuming continues
    both; unlike Lightning's, the live weights stay the training ones after fit, so the final `last.ckpt`
    resumes correctly). Beyond Lightning's fixed-decay EMA this one (a) warms the decay up, decay_n = min(decay,
    (1 + n) / (10 + n)) after n updates, so short runs are not dominated by the random initialisation (0.9999
    remembers ~10k steps), and (b) updates without reading anything back from the GPU.

    Args:
        decay: the EMA decay once warmed up (0.9999 in the paper).
        warmup: use the warm-up above; False gives the plain fixed-decay EMA.
        update_every_n_steps: update the average every n optimizer steps.
        start_step: first optimizer step that updates the average.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1,
                 start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            device = self._device or pl_module.device
            self._average_model = _EMAModel(pl_module, self.decay, self.warmup, device=device)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the training weights live (Lightning would copy the average in): a checkpoint saved after fit
        then still holds both, so resuming from it continues from the training weights, not the average."""


class DataStatsLogger(pl.Callback):
    """Logs the data layer's skipped-sample counts by reason (`data/skipped_<reason>`) and samples seen."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped_counts") or trainer.global_step % self.every_n_steps:
            return
        metrics = {f"data/skipped_{k}": float(v) for k, v in dm.skipped_counts("train").items()}
        metrics["data/samples_seen"] = float(dm.samples_seen())
        # Counts are per rank: summed over ranks they are the global totals.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch of the project's batch contract (for ThroughputMonitor)."""
    for key in ("image", "image_embed", "text_embed"):
        if key in batch:
            return int(batch[key].shape[0])
    return len(batch["caption"])
