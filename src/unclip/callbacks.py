"""Callbacks Lightning lacks: EMA with warm-up, a run length fitted to a time budget, a stop on divergence, an
exception checkpoint only after progress, logging of the data layer's skip counts, a clean stop on a cluster's
preemption signals, and random streams that survive a resume."""

from __future__ import annotations

import atexit
import logging
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import OnExceptionCheckpoint, Timer, WeightAveraging
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.optim.swa_utils import AveragedModel

from unclip.utils.ranks import gather_per_rank

log = logging.getLogger(__name__)

__all__ = ["EMA", "DataStatsLogger", "ExceptionCheckpoint", "FitTimeBudget", "Preemption", "RNGState",
           "StopOnDivergence", "TrainingDiverged", "batch_size"]


class _EMAModel(AveragedModel):
    """AveragedModel whose update is one fused pass with the decay computed on the device (no host sync).

    Parameters are averaged; buffers (counters such as `nonfinite_steps`, fixed schedules and statistics) are
    copied, so the copy reports the run's counts rather than an average of them.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool, device=None) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        ours, theirs = list(self.module.parameters()), list(model.parameters())
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, [b.to(a.device) for a, b in zip(buffers, model.buffers())])
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
    remembers ~10k steps), (b) updates without reading anything back from the GPU, and (c) builds the copy at
    fit start, on the device the strategy moved the module to (Lightning builds it in `setup`, before the
    move, so on a GPU the average would live on the CPU and every update would copy all weights across).

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
        self._restored: dict[str, Any] | None = None  # the average read from a checkpoint before fit start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: the copy is built in `on_fit_start`, once the module is on its device."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._average_model = _EMAModel(pl_module, self.decay, self.warmup, device=self._device or pl_module.device)
        if self._restored is not None:
            self._average_model.load_state_dict(self._restored)
            self._restored = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Lightning restores a resumed checkpoint before fit start (for most strategies): keep the average for
        `on_fit_start` and load the training weights into the module now."""
        if self._average_model is not None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            self._restored = {"module." + k: v for k, v in checkpoint["state_dict"].items()}
            self._restored |= checkpoint["averaging_state"]
            pl_module.load_state_dict(checkpoint["current_model_state"])

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the training weights live (Lightning would copy the average in): a checkpoint saved after fit
        then still holds both, so resuming from it continues from the training weights, not the average."""


class FitTimeBudget(pl.Callback):
    """Fits the run's length to `trainer.max_time`: the last step, and with it the end of the LR schedule
    (unclip.systems.base.WarmupCosine), move to the step the time budget is expected to reach, so the decay
    completes and the final weights are annealed rather than cut off mid-schedule when the time runs out.
    `trainer.max_steps` stays the upper bound. The run ends the way a `max_time` stop does, at the planned step
    or at `max_steps`, whichever comes first: one last validation, then `last.ckpt` (Lightning itself ends a
    `max_steps` run without validating, so a run's curves and final figures would stop at the last
    `val_check_interval` before it). Without `max_time` only that last validation is added.

    The step rate is measured from `skip_steps` after the start (compilation and loader start-up left out),
    validation time included, and the plan is made every `estimate_at` steps and after each validation, from
    rank 0's clock (one broadcast each time). Kept free at the end: `reserve` of the budget plus the longest
    validation seen so far.

    Args:
        skip_steps: steps after the start that the rate leaves out.
        estimate_at: steps between plans (the first one `estimate_at` steps after the start).
        reserve: fraction of `max_time` kept free at the end (the last checkpoint, timing noise).
    """

    def __init__(self, skip_steps: int = 20, estimate_at: int = 100, reserve: float = 0.03) -> None:
        if not 0 <= skip_steps < estimate_at:
            raise ValueError(f"need 0 <= skip_steps < estimate_at, got {skip_steps} and {estimate_at}")
        self.skip_steps, self.estimate_at, self.reserve = skip_steps, estimate_at, reserve
        self._timer: Timer | None = None
        self._start_step = 0
        self._ref: tuple[int, float] | None = None  # (step, time) the rate is measured from
        self._max_steps = -1
        self._val_start = 0.0
        self._val_seconds = 0.0
        self._end_step: int | None = None

    @staticmethod
    def plan(step: int, steps_per_s: float, remaining_s: float, max_steps: int, reserve_s: float = 0.0) -> int:
        """The last step the budget reaches: step + rate * (remaining - reserve), within [step + 1, max_steps]
        (max_steps < 0: no upper bound; a run already at max_steps ends there)."""
        target = max(step + 1, step + int(steps_per_s * max(0.0, remaining_s - reserve_s)))
        return min(target, max_steps) if max_steps >= 0 else target

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if self._timer is not None and self._timer.time_remaining() is None:
            self._timer = None
        self._start_step, self._ref, self._max_steps = trainer.global_step, None, trainer.max_steps
        self._end_step = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # validate at the last step too (see the class docstring)
        if self._timer is None:
            return
        done = trainer.global_step - self._start_step
        if done == self.skip_steps:
            self._ref = (trainer.global_step, time.monotonic())
        elif done > 0 and done % self.estimate_at == 0:
            self._replan(trainer)
        if self._end_step is not None and trainer.global_step >= self._end_step:
            trainer.should_stop = True  # as at max_time: Lightning validates once more, then stops

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._timer is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_seconds = max(self._val_seconds, time.monotonic() - self._val_start)
        self._replan(trainer)

    def _replan(self, trainer: pl.Trainer) -> None:
        if self._ref is None or trainer.global_step <= self._ref[0] or trainer.should_stop:
            return
        step = trainer.global_step
        rate = (step - self._ref[0]) / (time.monotonic() - self._ref[1])
        remaining = self._timer.time_remaining()
        reserve = self.reserve * (self._timer.time_elapsed() + remaining) + self._val_seconds
        target = self.plan(step, rate, remaining, self._max_steps, reserve)
        target = int(trainer.strategy.broadcast(target))
        if target == self._end_step:
            return
        self._end_step = target
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", []):
                if hasattr(schedule, "total_steps"):
                    schedule.total_steps = target
        rank_zero_info(f"time budget: {rate:.2f} steps/s at step {step}, {remaining:.0f} s "
                       f"left -> the run and its LR schedule end at step {target}")


class TrainingDiverged(RuntimeError):
    """Training produced nothing but non-finite losses or gradients, or non-finite weights."""


class StopOnDivergence(pl.Callback):
    """Stops a run that keeps diverging, and never saves non-finite weights over a good checkpoint.

    A step with a non-finite loss or gradient is skipped and counted by the system (`train/nonfinite_steps`);
    its device-side `nonfinite_streak` counts such steps in a row. It is read every `check_every_n_steps`
    (one host sync per interval, none in the steps between): at `max_nonfinite_streak` or more the run stops
    with TrainingDiverged. Before every checkpoint save the weights are checked (one sync per save): non-finite
    weights (e.g. from `lr=inf`) stop the run instead of being written, so the newest checkpoint on disk is
    the last good one. The exception checkpoint (ExceptionCheckpoint) is not written either.

    Args:
        max_nonfinite_streak: consecutive non-finite steps that stop the run.
        check_every_n_steps: optimizer steps between reads of the streak.
    """

    def __init__(self, max_nonfinite_streak: int = 100, check_every_n_steps: int = 50) -> None:
        if max_nonfinite_streak < 1 or check_every_n_steps < 1:
            raise ValueError("max_nonfinite_streak and check_every_n_steps must be >= 1")
        self.max_nonfinite_streak, self.check_every_n_steps = max_nonfinite_streak, check_every_n_steps
        self._checked_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        streak = getattr(pl_module, "nonfinite_streak", None)
        if streak is None or step % self.check_every_n_steps or step == self._checked_step:
            return
        self._checked_step = step
        streak = int(streak)  # the same on every rank: gradients are reduced before the norm is taken
        if streak >= self.max_nonfinite_streak:
            raise TrainingDiverged(f"training diverged: the last {streak} steps (to step {step}) had a non-finite "
                                   f"loss or gradient; {self._last_good(trainer)}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        params = [p for p in pl_module.parameters() if p.is_floating_point()]
        finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):  # sharded weights: every rank agrees
            raise TrainingDiverged(f"training diverged: the weights are non-finite (NaN/inf) at step "
                                   f"{trainer.global_step} and were not saved; {self._last_good(trainer)}")

    @staticmethod
    def _last_good(trainer: pl.Trainer) -> str:
        cb = trainer.checkpoint_callback
        last = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if last:
            return f"the last good checkpoint is {last}: lower model.optimizer.lr and resume from it (ckpt_path=...)"
        return "no checkpoint was saved before it: lower model.optimizer.lr and start again"


class ExceptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's OnExceptionCheckpoint, written only when the run trained at least one step since it started
    (or resumed) and did not diverge: a run that fails before training (a bad resume file, shards that match
    nothing) or on garbage weights leaves no checkpoint that looks like a model."""

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        super().__init__(dirpath, filename)
        self._start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            return
        if isinstance(exception, TrainingDiverged):
            return
        super().on_exception(trainer, pl_module, exception)


class DataStatsLogger(pl.Callback):
    """Logs the data layer's skipped-sample counts by reason (`data/skipped_<reason>`) and samples seen, and
    after each validation the validation stream's totals (`data/val_skipped`, `data/val_skipped_<reason>`)."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped_counts") or trainer.global_step % self.every_n_steps:
            return
        # Counts are per rank, and ranks know different reasons (one met a corrupt image, another did not): summed
        # as objects, not with one collective per key, whose sequences would differ between ranks and break DDP.
        counts = _summed_over_ranks(trainer, {**dm.skipped_counts("train"), _SEEN: dm.samples_seen()})
        metrics = {f"data/skipped_{k}": float(v) for k, v in sorted(counts.items()) if k != _SEEN}
        metrics["data/samples_seen"] = float(counts[_SEEN])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)  # already global totals

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped_counts") or trainer.sanity_checking:
            return
        counts = _summed_over_ranks(trainer, dm.skipped_counts("val"))
        metrics = {"data/val_skipped": float(sum(counts.values()))}
        metrics |= {f"data/val_skipped_{k}": float(v) for k, v in sorted(counts.items())}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)  # already global totals


_SEEN = " samples_seen"  # a key no skip reason can have (reasons are single words)


def _summed_over_ranks(trainer: pl.Trainer, counts: dict[str, int]) -> dict[str, int]:
    """Counts by key summed over ranks (ranks may know different skip reasons, so gathered as objects)."""
    total: dict[str, int] = {}
    for rank_counts in gather_per_rank(trainer, dict(counts)):
        for reason, n in (rank_counts or {}).items():
            total[reason] = total.get(reason, 0) + n
    return total


class Preemption(pl.Callback):
    """A clean stop on a cluster's signal. SIGTERM (preemption, scancel, a container stop) or SIGUSR1 / SIGUSR2
    (the warning SLURM sends ahead of the time limit with `--signal`; submitit asks for USR2) ends `fit` at
    the next optimizer-step boundary, as if `max_steps` were reached there: train.py then writes `last.ckpt`
    for that step and the process exits with status 0. Launched again into the same run folder, train.py
    resumes from it. Under SLURM (SLURM_JOB_ID set), a signal in `requeue_signals` also requeues the job
    (`scontrol requeue`, when the process exits after writing the checkpoint), so it resumes by itself.

    The handler only notes the signal: stopping between steps keeps the checkpoint a consistent step (it is
    what replaces Lightning's SLURM handler, which saves from inside the signal handler, mid-step). With
    several ranks they agree (one all-reduce of a flag) every `check_every_n_steps` steps and after each
    validation; DataLoader workers ignore these signals and are shut down by the main process.

    Args:
        signals: names of the signals that stop the run.
        requeue_signals: those that also requeue a SLURM job.
        check_every_n_steps: steps between the ranks' agreements (a single process checks every step).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
                 requeue_signals: Sequence[str] = ("SIGUSR1", "SIGUSR2"), check_every_n_steps: int = 10) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue_signals = {signal.Signals[name] for name in requeue_signals}
        self.check_every_n_steps = max(1, check_every_n_steps)
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own handlers (registered when fit starts), which these replace until teardown.
        self.received, self.stopped_at = None, None
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not a step boundary: the accumulated batches would be lost
        if trainer.world_size == 1 or trainer.global_step % self.check_every_n_steps == 0:
            self._maybe_stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        if self.stopped_at is not None:
            return
        stop, requeue = self.received is not None, self.received in self.requeue_signals
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop:
                requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        if not stop:
            return
        self.stopped_at = trainer.global_step
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step
        name = self.received.name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"preemption: {name} received; training stops at step {trainer.global_step}")
        job = _slurm_job_id()
        if requeue and job and trainer.is_global_zero:
            atexit.register(_requeue, job)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous.clear()


def _slurm_job_id() -> str | None:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _requeue(job: str) -> None:
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("preemption: requeued SLURM job %s", job)
    else:
        log.warning("preemption: `scontrol requeue %s` failed (%s): %s", job, result.returncode, result.stderr)


class RNGState(pl.Callback):
    """The global random streams (Python, NumPy, torch CPU and the current CUDA device) continue across a
    resume as if the run had never stopped.

    Each checkpoint holds every rank's streams; after a resume they are set again right before the first
    training step (after the system's own seeding in `on_train_start`). Validation leaves the streams as it
    found them, so the state saved at a validation step is the one the next training step draws from.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._pending: list | None = None  # per-rank states loaded from a checkpoint
        self._outside_validation: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        state = self._outside_validation or _rng_state(self._device())
        return {"ranks": gather_per_rank(self._trainer, state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["ranks"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) == trainer.world_size and ranks[trainer.global_rank] is not None:
            _set_rng_state(ranks[trainer.global_rank], self._device())
        else:
            rank_zero_warn(f"random streams not restored: the checkpoint holds {len(ranks)} rank(s), this run "
                           f"has {trainer.world_size}; the system's per-rank seeding is used instead")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outside_validation = _rng_state(self._device())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outside_validation is not None:
            _set_rng_state(self._outside_validation, self._device())
        self._outside_validation = None

    def _device(self) -> torch.device:
        return self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states in plain types and tensors (a checkpoint loads them weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch of the project's batch contract (for ThroughputMonitor)."""
    for key in ("image", "image_embed", "text_embed"):
        if key in batch:
            return int(batch[key].shape[0])
    return len(batch["caption"])
