"""Training: instantiate data, model, callbacks, loggers and trainer from the Hydra config, then fit."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import unclip.config  # noqa: F401  (registers the config resolvers)

log = logging.getLogger(__name__)

# Known and harmless: the training stream carries a length on purpose (one epoch = epoch_length samples).
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# The WebDataModule's state_dict holds the training stream's position (unclip.data.stream), which Lightning's
# check for a stateful DataLoader does not see.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")

__all__ = ["train", "instantiate_group"]


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` of a config group like `callbacks` or `logger`."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one stage; returns the final metrics and the path of the last checkpoint."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and last.is_file():  # relaunched into an existing run folder (e.g. a requeued job)
        ckpt_path = str(last)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    with warnings.catch_warnings():
        # With OnExceptionCheckpoint, Lightning reads ckpt_path=None as "last" and warns when there is none.
        warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model.*")
        warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available.*")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    ckpt_cb = trainer.checkpoint_callback
    if getattr(ckpt_cb, "_last_global_step_saved", None) != trainer.global_step or not last.is_file():
        trainer.save_checkpoint(last)  # the final step, whatever the checkpoint interval
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    log.info("checkpoint: %s", last)
    return {"metrics": metrics, "checkpoint": str(last), "global_step": trainer.global_step}
