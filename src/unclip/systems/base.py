"""What every stage's LightningModule shares: frozen CLIP, conditioning, optimiser, clipping, checkpoints.

A stage system joins data, the frozen CLIP encoder, a net and the diffusion math. The CLIP encoder is held
*outside* the module tree: it is not in the state dict, the optimizer, DDP's buckets or the EMA copy; the
checkpoint records its identity instead (DESIGN.md section 3).
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import unclip
from unclip.clip.encoder import ClipEncoder

__all__ = ["FrozenRef", "StageSystem", "WarmupCosine", "net_for_clip", "plain", "warmup_cosine"]


class FrozenRef:
    """Holds a module without registering it; shared (never deep-copied) by the EMA copy of the system."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> FrozenRef:
        return self


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (checkpoints must load with weights_only=True)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def net_for_clip(net: nn.Module | Callable[..., nn.Module], clip: ClipEncoder | None,
                 widths: dict[str, str]) -> nn.Module:
    """The net, or, given a partial (the configs' `_partial_: true`), the net built with the widths it leaves
    unset (None) taken from the CLIP encoder, so any CLIP works with any preset: `widths` maps net argument
    -> ClipEncoder attribute (e.g. {"embed_dim": "embed_dim"}). A width set on the command line is kept (and
    checked against the CLIP by the system)."""
    if isinstance(net, nn.Module):
        return net
    keywords = getattr(net, "keywords", {})
    unset = [arg for arg in widths if keywords.get(arg) is None]
    fill = {arg: getattr(clip, widths[arg], None) for arg in unset}
    missing = [arg for arg, value in fill.items() if value is None]
    if missing:
        raise ValueError(f"model.net leaves {', '.join(missing)} unset and the CLIP encoder cannot tell them: "
                         f"set model.net.{missing[0]}=...")
    return net(**fill)


class StageSystem(pl.LightningModule):
    """Base of the prior, decoder and upsampler systems.

    Args:
        clip: the frozen CLIP encoder (None for stages that never need it, e.g. upsamplers).
        optimizer: a partial of the optimizer class taking the parameter groups (Hydra `_partial_`).
        warmup_steps: linear warm-up from ~0 to the base learning rate.
        lr_decay: "cosine" (to `min_lr_ratio` of the base rate at the last step) or "constant".
        min_lr_ratio: the final learning rate as a fraction of the base one.
        compile: compile the training step's net forward with torch.compile (True: the default backend,
            inductor; a string: that backend). Validation and sampling call the net eager, so their other
            batch sizes and modes (eval, no grad) cost no recompilation.
    """

    stage: str = ""

    def __init__(
        self,
        clip: ClipEncoder | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 1000,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
        if clip is not None and clip.trainable:
            raise ValueError("stage systems use a frozen CLIP encoder: build it with trainable=False")
        self._clip = FrozenRef(clip)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-4)
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.min_lr_ratio = min_lr_ratio
        self.compile_net = compile
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.float32))  # kept across resumes
        # non-finite steps in a row, on the device (read rarely, by unclip.callbacks.StopOnDivergence)
        self.register_buffer("nonfinite_streak", torch.zeros((), dtype=torch.float32), persistent=False)
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor (MFU)

    # ------------------------------------------------------------------ frozen CLIP
    @property
    def clip(self) -> ClipEncoder:
        if self._clip.module is None:
            raise RuntimeError(f"the {self.stage} system was built without a CLIP encoder")
        return self._clip.module

    def _apply(self, fn, *args, **kwargs):
        """Moves/casts the frozen CLIP along with the system although it is not a registered submodule."""
        super()._apply(fn, *args, **kwargs)
        if self._clip.module is not None:
            self._clip.module._apply(fn)
        return self

    def clip_features(self, batch: dict[str, Any], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The CLIP fields `names` for a batch: precomputed ones from the batch, the rest from the frozen CLIP.

        image_embed is computed from `clip_image` when the data layer provides it (a full-resolution view),
        else from `image`. Precomputed fp16 fields are cast to float32.
        """
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name in batch:
                value = batch[name]
                out[name] = value if value.dtype == torch.bool else value.float()
        missing_text = [n for n in ("text_embed", "text_tokens", "text_mask") if n in names and n not in out]
        if missing_text:
            encoded = self.clip.encode_text(batch["caption"])
            out.update({n: encoded[n].float() if n != "text_mask" else encoded[n] for n in missing_text})
        if "image_embed" in names and "image_embed" not in out:
            out["image_embed"] = self.clip.encode_image(batch.get("clip_image", batch.get("image"))).float()
        return out

    # ------------------------------------------------------------------ nets
    def setup(self, stage: str) -> None:
        if stage == "fit" and hasattr(self, "net"):
            self.compile_for_training(self.net)

    def compile_for_training(self, module: nn.Module) -> None:
        """With `compile` set, keep a compiled `module` for the training step (`train_net`), once. It is not
        registered as a submodule (and held in a FrozenRef, which the EMA's deep copy shares rather than copies):
        the state dict, optimizer and EMA see only the module itself."""
        if self.compile_net and "_train_net" not in self.__dict__:
            backend = self.compile_net if isinstance(self.compile_net, str) else "inductor"
            object.__setattr__(self, "_train_net", FrozenRef(torch.compile(module, backend=backend)))

    @property
    def train_net(self) -> nn.Module:
        """The net as the training step calls it: compiled when `compile` is set, else `net` itself."""
        compiled = self.__dict__.get("_train_net")
        return compiled.module if compiled is not None else self.net

    def on_train_start(self) -> None:
        """Give every rank its own random stream for timesteps, noise, drop masks and augmentations.

        Lightning seeds every rank alike (seed_everything, then reset_seed in DDP), which would make all ranks
        draw the same (t, eps, drop) for their different images; mixing in the rank and the step also gives a
        resumed run fresh draws instead of replaying the first steps (with `unclip.callbacks.RNGState`, in the
        default callbacks, a resumed run instead takes back the streams its checkpoint saved).
        """
        seed = stream_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank, self.global_step)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms, embeddings and learned null/positional vectors."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or any(k in name for k in ("norm", "embedding", "null_", "pos_emb", "query"))
            (no_decay if exempt else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        factory = self.optimizer_factory
        weight_decay = factory.keywords.get("weight_decay", 0.0) if isinstance(factory, functools.partial) else 0.0
        optimizer = factory(self.parameter_groups(weight_decay))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        scheduler = warmup_cosine(optimizer, self.warmup_steps, total, self.lr_decay, self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm, log it, and skip the update on a non-finite gradient.

        With fused AdamW (the configs' default) this needs no host sync: the kernel reads `optimizer.found_inf`
        on the device and leaves weights, moments and its step count untouched when it is 1 (the mechanism AMP
        grad scaling uses). Other optimizers read the flag on the host and get no gradients for that step.
        """
        if gradient_clip_algorithm == "value" or "fsdp" in type(self.trainer.strategy).__name__.lower():
            # value clipping, or sharded gradients: Lightning's own clipping
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        found_inf = (~torch.isfinite(norm)).float()
        self.nonfinite_steps += found_inf
        self.nonfinite_streak.mul_(found_inf).add_(found_inf)  # +1 on a skipped step, 0 after a good one
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = found_inf
        elif bool(found_inf):  # other optimizers: one host read per step; without gradients they skip
            for p in params:
                p.grad = None
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/nonfinite_steps", self.nonfinite_steps, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoints
    def stage_metadata(self) -> dict[str, Any]:
        """What a checkpoint needs to be used without this code's config: see unclip.checkpoint."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = {"stage": self.stage, "version": unclip.__version__, **plain(self.stage_metadata())}
        checkpoint["unclip"] = meta

    def net_metadata(self) -> dict[str, Any]:
        net = self.net
        net = getattr(net, "_orig_mod", net)
        return {"class": f"{type(net).__module__}.{type(net).__qualname__}", "config": plain(net.config)}

    def measure_flops(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> None:
        """Model FLOPs of one training step's net forward + backward (torch.utils.flop_counter), measured once
        on a meta-device copy of the net, so ThroughputMonitor can report MFU."""
        if self.flops_per_batch is not None or self._trainer is None:
            return
        from pytorch_lightning.callbacks import ThroughputMonitor
        from torch.utils.flop_counter import FlopCounterMode

        if not any(isinstance(c, ThroughputMonitor) for c in self.trainer.callbacks):
            return
        with torch.device("meta"):
            net = type(self.net)(**self.net.config)

        def meta(v: Any) -> Any:
            return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v

        with FlopCounterMode(display=False) as counter:
            net(meta(x_t), meta(t), **{k: meta(v) for k, v in cond.items()}).float().sum().backward()
        self.flops_per_batch = int(counter.get_total_flops())

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def drop_mask(self, batch_size: int, prob: float) -> torch.Tensor:
        """(B,) bool, True with probability `prob`: the sample's conditioning is dropped (guidance training)."""
        return torch.rand(batch_size, device=self.device) < prob


def stream_seed(base: int, rank: int, step: int) -> int:
    """The seed of one rank's random stream from the run's seed, the rank and the step training starts at."""
    return (base * 1_000_003 + rank * 10_007 + step) % (2**31 - 1)


class WarmupCosine:
    """LR factor at a step: linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_ratio` at
    `total_steps` (constant after warm-up when `decay` is not "cosine" or `total_steps` <= 0).

    A closed form in the step, held in a callable object: LambdaLR's state_dict keeps its fields, so
    `total_steps` can change during a run (unclip.callbacks.FitTimeBudget) and the change survives a resume.
    """

    def __init__(self, warmup_steps: int, total_steps: int, decay: str = "cosine", min_ratio: float = 0.0) -> None:
        self.warmup_steps, self.total_steps = max(0, int(warmup_steps)), int(total_steps)
        self.decay, self.min_ratio = decay, float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay != "cosine" or self.total_steps <= 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float):
    """LambdaLR over WarmupCosine: linear warm-up, then cosine decay to `min_lr_ratio` times each group's LR."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, decay, min_lr_ratio))
