"""Training: instantiate data, model, callbacks, loggers and trainer from the Hydra config, then fit."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import CheckpointError, check_resume_checkpoint
from unclip.config import check_config  # (importing it registers the config resolvers)

log = logging.getLogger(__name__)

# Known and harmless: the training stream carries a length on purpose (one epoch = epoch_length samples).
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# The WebDataModule's state_dict holds the training stream's position (unclip.data.stream), which Lightning's
# check for a stateful DataLoader does not see.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")

__all__ = ["train", "instantiate_group", "resume_checkpoint"]


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` of a config group like `callbacks` or `logger`."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one stage; returns the final metrics and the path of the last checkpoint."""
    check_config(cfg, ("data", "model", "trainer", "callbacks", "logger"))  # wrong types fail here, not mid-fit
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if cfg.get("prepare_only"):  # e.g. generate `shapes` once before several stages start side by side
        datamodule.prepare_data()
        return {"metrics": {}, "checkpoint": None, "global_step": 0}
    model = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), last.parent, model)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    with warnings.catch_warnings():
        # With OnExceptionCheckpoint, Lightning reads ckpt_path=None as "last" and warns when there is none.
        warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model.*")
        warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available.*")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    ckpt_cb = trainer.checkpoint_callback
    saved_last = Path(getattr(ckpt_cb, "last_model_path", "") or "/nonexistent").resolve() == last.resolve()
    if getattr(ckpt_cb, "_last_global_step_saved", None) != trainer.global_step or not saved_last:
        trainer.save_checkpoint(last, weights_only=False)  # the final step (full state, for resuming), as last.ckpt
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    log.info("checkpoint: %s", last)
    return {"metrics": metrics, "checkpoint": str(last), "global_step": trainer.global_step}


def resume_checkpoint(ckpt_path: str | None, ckpt_dir: Path, model: pl.LightningModule) -> str | None:
    """The checkpoint to resume from, checked before Lightning reads it (weights only, right stage and shapes).

    `ckpt_path` given: that file, or a CheckpointError naming it. Otherwise, a relaunch into an existing run
    folder (e.g. a requeued job) resumes from its `last.ckpt`, or, when that one cannot be used, from the
    usable checkpoint of the highest step in the folder; a folder with checkpoints but no usable one is an
    error rather than a silent fresh start over them.
    """
    if ckpt_path:
        check_resume_checkpoint(ckpt_path, model)
        return str(ckpt_path)
    found = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    last = ckpt_dir / "last.ckpt"
    reasons = []
    if last in found:
        try:
            check_resume_checkpoint(last, model)
            return str(last)
        except CheckpointError as err:
            reasons.append(str(err))
            log.warning("cannot resume from %s (%s); looking for another checkpoint in %s", last, err, ckpt_dir)
    usable = []
    for path in (p for p in found if p != last):
        try:
            step = int(check_resume_checkpoint(path, model).get("global_step", 0))
        except CheckpointError as err:
            reasons.append(str(err))
            continue
        usable.append((step, path.stat().st_mtime, path))
    if usable:
        return str(max(usable)[2])
    if found:
        raise CheckpointError(f"{ckpt_dir} holds checkpoints but none can resume this run ({reasons[0]}); pass "
                              "ckpt_path=PATH, or start in a new run folder")
    return None
