"""The image stages: the decoder (CLIP image embedding -> 64 px) and the upsamplers (64 -> 256 -> 1024).

Both train a UNet with `GaussianDiffusion.training_losses` and log
    train/loss, train/loss_t<lo>-<hi> (loss by timestep quartile), train/grad_norm;
    val/loss (fixed seeds), and every validation run a grid of samples from a fixed set of validation images
    and seeds (EMA weights) saved under <run dir>/samples/ and sent to loggers that take images.
Decoder (Ramesh et al. 2022, sec. 2.1): conditioning on the CLIP image embedding (added to the timestep
embedding and as 4 context tokens) and the caption's token encodings; image embedding dropped with
`image_drop_prob`, caption with `text_drop_prob` (guidance training). Its grid shows reconstructions from the
validation images' true embeddings; val/recon_clip_cosine is cos(CLIP(reconstruction), embedding), and on
`shapes` val/shapes_<split>_<attribute> and val/shapes_acc_<split> (all right) read attributes back from the
reconstructions, each only at image sizes where ShapesEval judges it.
Upsampler: conditioning on the low-resolution image, corrupted in training (blur, or BSR-style for 1024),
optionally noised with its level fed to the net; trained on random crops (`train_crop_size`, a quarter of the
target side by default) of the target and of the upsampled conditioning; val/psnr and val/psnr_bicubic
compare its samples and plain bicubic upsampling with the real high-resolution images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unclip.clip.encoder import ClipEncoder
from unclip.data.degradation import bsr_degrade, gaussian_blur_aug, paired_random_crop
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.generate import DECODER_DROP, SamplerConfig, sample_images, upsample_images, upsampler_cond
from unclip.nets.unet import conv_memory_format, resize_lowres
from unclip.systems.base import StageSystem, net_for_clip, plain
from unclip.utils.images import grid, save_png
from unclip.utils.ranks import keys_on_every_rank

__all__ = ["DecoderSystem", "UpsamplerSystem", "psnr"]

NUM_BUCKETS = 4


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], per sample (B,)."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return -10 * torch.log10(mse)


class ImageStageSystem(StageSystem):
    """Shared training / validation machinery of the decoder and upsampler systems."""

    def __init__(self, net, diffusion, clip, sampler, num_val_samples, val_seed, optimizer, warmup_steps, lr_decay,
                 min_lr_ratio, compile) -> None:
        super().__init__(clip, optimizer, warmup_steps, lr_decay, min_lr_ratio, compile)
        expected = 6 if diffusion.learn_sigma else 3
        if getattr(net, "config", {}).get("out_channels", expected) != expected:
            raise ValueError(f"diffusion.learn_sigma={diffusion.learn_sigma} needs a net with {expected} output "
                             f"channels, got {net.config['out_channels']} (set model.net.out_channels={expected})")
        self.net = net
        self.diffusion = diffusion
        self.sampler = SamplerConfig.from_any(sampler, name="ddim", num_steps=50, thresholding="static")
        self.num_val_samples = num_val_samples
        self.val_seed = val_seed
        self.register_buffer("bucket_sum", torch.zeros(NUM_BUCKETS), persistent=False)
        self.register_buffer("bucket_count", torch.zeros(NUM_BUCKETS), persistent=False)
        self._val_grid: tuple[list[torch.Tensor], dict[str, float]] | None = None

    # ------------------------------------------------------------------ to implement per stage
    def training_inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x_0 target images (B, C, H, W), net conditioning) for a batch."""
        raise NotImplementedError

    def sample_batch(self, batch: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        """Samples (B, C, H, W) in [-1, 1] for a validation batch, with this system's sampler."""
        raise NotImplementedError

    def val_rows(self, batch: dict[str, Any], samples: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The grid's rows and the sample metrics for the validation sample batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.net(x_t, t, **cond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, cond = self.training_inputs(batch, train=True)
        x0 = x0.contiguous(memory_format=conv_memory_format(x0.device))
        out = self.diffusion.training_losses(self.train_net, x0, on_inputs=self.measure_flops, **cond)
        per_sample, t = out["loss"], out["t"]
        bucket = (t * NUM_BUCKETS // self.diffusion.num_timesteps).clamp(max=NUM_BUCKETS - 1)
        self.bucket_sum.index_add_(0, bucket, per_sample.detach())
        self.bucket_count.index_add_(0, bucket, torch.ones_like(per_sample))
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        if "vlb" in out:  # learned variance: the VLB term in bits/dim, before its clamp
            self.log("train/vlb", out["vlb"].mean(), batch_size=x0.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % self.trainer.log_every_n_steps:
            return
        means = self.bucket_sum / self.bucket_count.clamp(min=1)
        width = self.diffusion.num_timesteps // NUM_BUCKETS
        counts = self.bucket_count.tolist()  # one read per logging interval, not per step
        metrics = {f"train/loss_t{i * width}-{(i + 1) * width}": means[i] for i in range(NUM_BUCKETS) if counts[i]}
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False)
        self.bucket_sum.zero_()
        self.bucket_count.zero_()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, cond = self.training_inputs(batch, train=False)
        b = x0.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(self.val_seed + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=self.device, generator=gen)
        noise = torch.randn(x0.shape, device=self.device, generator=gen)
        loss = self.diffusion.training_losses(self.net, x0, t=t, noise=noise, **cond)["loss"].mean()
        self.log("val/loss", loss, sync_dist=True, batch_size=b)
        if batch_idx == 0 and self.num_val_samples > 0 and not self.trainer.sanity_checking:
            # Sampled here, not at epoch end: only during the validation steps are the EMA weights in place.
            n = min(self.num_val_samples, b)
            first = {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            samples = self.sample_batch(first, [self.val_seed + i for i in range(n)])
            self._val_grid = self.val_rows(first, samples)

    def on_validation_epoch_end(self) -> None:
        """Logs the sample metrics and the grid of samples from the fixed validation images and seeds."""
        result, self._val_grid = self._val_grid, None
        if result is None:
            return
        rows, metrics = result
        metrics = keys_on_every_rank(self.trainer, metrics)  # each rank scored its own samples' captions
        if metrics:
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        if self.trainer.is_global_zero:
            self.log_grid(rows)

    def log_grid(self, rows: list[torch.Tensor]) -> None:
        image = grid(rows)
        root = Path(self.trainer.default_root_dir)
        save_png(image, root / "samples" / f"{self.stage}_step{self.global_step:07d}.png")
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[image], step=self.global_step,
                                 caption=[f"{self.stage} step {self.global_step}"])

    def stage_metadata(self) -> dict[str, Any]:
        return {
            "net": self.net_metadata(),
            "diffusion": self.diffusion.config,
            "clip": self.clip.identity if self._clip.module is not None else None,
            "embed_stats": None,
            "system": plain(self.system_metadata()),
        }

    def system_metadata(self) -> dict[str, Any]:
        return {"sampler": self.sampler.to_dict()}


class DecoderSystem(ImageStageSystem):
    """LightningModule of the 64 px decoder (GLIDE-style UNet conditioned on CLIP).

    Args:
        net: a UNet built with image_embed_dim (and text_token_dim to use the caption's token encodings), or a
            partial of one: the widths it leaves None (image_embed_dim, text_token_dim) come from the CLIP.
        diffusion: forward process and loss (v prediction with min-SNR weighting is a good default).
        clip: the frozen CLIP encoder.
        image_drop_prob: probability of dropping the image embedding in training (0.1 in the paper).
        text_drop_prob: probability of dropping the caption (0.5 in the paper).
        sampler: validation / default sampling settings (SamplerConfig keys; cond_scale is the guidance).
        num_val_samples: how many fixed validation images the sample grid reconstructs.
        val_seed: seed of the validation noise and samples.
        optimizer, warmup_steps, lr_decay, min_lr_ratio, compile: see StageSystem.
    """

    stage = "decoder"

    def __init__(
        self,
        net: torch.nn.Module | Callable[..., torch.nn.Module],
        diffusion: GaussianDiffusion,
        clip: ClipEncoder | None = None,
        image_drop_prob: float = 0.1,
        text_drop_prob: float = 0.5,
        sampler: dict[str, Any] | None = None,
        num_val_samples: int = 8,
        val_seed: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 1000,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool | str = False,
    ) -> None:
        sampler = plain(sampler)
        net = net_for_clip(net, clip, {"image_embed_dim": "embed_dim", "text_token_dim": "token_dim"})
        super().__init__(net, diffusion, clip, sampler, num_val_samples, val_seed, optimizer, warmup_steps,
                         lr_decay, min_lr_ratio, compile)
        cfg = net.config
        if not cfg.get("image_embed_dim"):
            raise ValueError("the decoder's UNet needs image_embed_dim (it is conditioned on CLIP image embeddings)")
        if clip is not None and clip.embed_dim != cfg["image_embed_dim"]:
            raise ValueError(f"UNet image_embed_dim={cfg['image_embed_dim']} but CLIP embeds to {clip.embed_dim}")
        if clip is not None and cfg.get("text_token_dim") and clip.token_dim != cfg["text_token_dim"]:
            raise ValueError(f"UNet text_token_dim={cfg['text_token_dim']} but CLIP tokens are {clip.token_dim}-d")
        for name, p in (("image_drop_prob", image_drop_prob), ("text_drop_prob", text_drop_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.use_text = bool(cfg.get("text_token_dim"))
        self.image_drop_prob = image_drop_prob
        self.text_drop_prob = text_drop_prob
        self.image_size = cfg["image_size"]
        self.save_hyperparameters(ignore=["net", "diffusion", "clip", "optimizer"])

    def clip_fields(self) -> tuple[str, ...]:
        return ("image_embed", "text_tokens", "text_mask") if self.use_text else ("image_embed",)

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        f = self.clip_features(batch, self.clip_fields())
        cond = {"image_embed": F.normalize(f["image_embed"], dim=-1)}
        if self.use_text:
            cond.update(text_tokens=f["text_tokens"], text_mask=f["text_mask"])
        return cond

    def training_inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = batch["image"]
        if x0.shape[-1] != self.image_size:
            raise ValueError(f"decoder UNet is {self.image_size} px but the batch images are {x0.shape[-1]} px: "
                             f"set data.image_size={self.image_size}")
        cond = self.conditioning(batch)
        b = x0.shape[0]
        if train:
            cond["image_embed_drop_mask"] = self.drop_mask(b, self.image_drop_prob)
            if self.use_text:
                cond["text_drop_mask"] = self.drop_mask(b, self.text_drop_prob)
        return x0, cond

    def sample_batch(self, batch: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        cond = self.conditioning(batch)
        shape = (len(seeds), 3, self.image_size, self.image_size)
        drops = DECODER_DROP if self.use_text else DECODER_DROP[:1]
        return sample_images(self.net, self.diffusion, cond, shape, self.sampler, drops, seeds=seeds)

    def val_rows(self, batch: dict[str, Any], samples: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, float]]:
        metrics: dict[str, float] = {}
        target = self.conditioning(batch)["image_embed"]
        if self._clip.module is not None:
            recon = F.normalize(self.clip.encode_image(samples).float(), dim=-1)
            metrics["recon_clip_cosine"] = float((recon * target).sum(-1).mean())
        metrics.update(shapes_metrics(samples, batch.get("meta")))
        return [batch["image"], samples], metrics

    def system_metadata(self) -> dict[str, Any]:
        return {"sampler": self.sampler.to_dict(), "image_drop_prob": self.image_drop_prob,
                "text_drop_prob": self.text_drop_prob, "use_text": self.use_text,
                "drop_masks": list(DECODER_DROP if self.use_text else DECODER_DROP[:1])}


class UpsamplerSystem(ImageStageSystem):
    """LightningModule of an upsampler (64 -> 256, or 256 -> 1024 with `degradation="bsr"`).

    Args:
        net: a UNet built with lowres_cond=True (and noise_level_cond=True for noise augmentation).
        diffusion: forward process and loss (linear schedule for the 1024 model in the paper).
        lowres_size: side of the low-resolution conditioning image.
        degradation: "blur" (gaussian, kernel 3, for 64 -> 256), "bsr" (for 256 -> 1024) or "none".
        degradation_prob: probability that a training sample's conditioning is corrupted.
        blur_sigma: range of the blur's sigma for "blur".
        noise_aug_max_level: noise augmentation of the conditioning: a level drawn from [0, this) timesteps,
            fed to the net (0 = off; needs noise_level_cond).
        sample_noise_level: the augmentation level used at sampling time.
        train_crop_size: side of the random training crops (None = a quarter of the target size).
        residual: diffuse the difference between the target and the resized conditioning instead of the
            target itself (SRDiff, Li et al. 2022): flat regions need nothing, and training spends itself on
            the detail upsampling adds (with x_0 prediction the freshly built net already returns the resized
            low-resolution image). Sample without static thresholding (residuals span [-2, 2]).
        sampler, num_val_samples, val_seed, optimizer, warmup_steps, lr_decay, min_lr_ratio, compile: as above.
    """

    stage = "upsampler"

    def __init__(
        self,
        net: torch.nn.Module,
        diffusion: GaussianDiffusion,
        lowres_size: int = 64,
        degradation: str = "blur",
        degradation_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.4, 0.6),
        noise_aug_max_level: int = 0,
        sample_noise_level: int = 0,
        train_crop_size: int | None = None,
        residual: bool = False,
        sampler: dict[str, Any] | None = None,
        num_val_samples: int = 8,
        val_seed: int = 0,
        clip: ClipEncoder | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 1000,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool | str = False,
    ) -> None:
        sampler, blur_sigma = plain(sampler), tuple(plain(blur_sigma))
        super().__init__(net, diffusion, clip, sampler, num_val_samples, val_seed, optimizer, warmup_steps,
                         lr_decay, min_lr_ratio, compile)
        cfg = net.config
        if not cfg.get("lowres_cond"):
            raise ValueError("the upsampler's UNet needs lowres_cond=True")
        if degradation not in ("blur", "bsr", "none"):
            raise ValueError(f"degradation must be 'blur', 'bsr' or 'none', got {degradation!r}")
        if noise_aug_max_level and not cfg.get("noise_level_cond"):
            raise ValueError("noise_aug_max_level > 0 needs a UNet built with noise_level_cond=True")
        self.image_size = cfg["image_size"]
        if lowres_size >= self.image_size:
            raise ValueError(f"lowres_size={lowres_size} must be below the UNet's image_size={self.image_size}")
        self.lowres_size = lowres_size
        self.degradation = degradation
        self.degradation_prob = degradation_prob
        self.blur_sigma = blur_sigma
        self.noise_aug_max_level = noise_aug_max_level
        self.sample_noise_level = sample_noise_level
        self.train_crop_size = train_crop_size or self.image_size // 4
        self.residual = residual
        self.save_hyperparameters(ignore=["net", "diffusion", "clip", "optimizer"])

    def corrupt(self, lowres: torch.Tensor) -> torch.Tensor:
        if self.degradation == "blur":
            return gaussian_blur_aug(lowres, self.degradation_prob, 3, self.blur_sigma)
        if self.degradation == "bsr":
            return bsr_degrade(lowres, self.degradation_prob)
        return lowres

    def lowres_cond(self, lowres: torch.Tensor, level: torch.Tensor | int | None,
                    seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The conditioning at the target size, noised to `level` when the net takes a noise level."""
        noised = bool(self.net.config.get("noise_level_cond"))
        return upsampler_cond(lowres, self.image_size, self.diffusion if noised else None,
                              (0 if level is None else level) if noised else None, seeds=seeds)

    def get_lowres(self, batch: dict[str, Any]) -> torch.Tensor:
        if "lowres_image" in batch:
            return batch["lowres_image"]
        return F.interpolate(batch["image"].float(), size=(self.lowres_size, self.lowres_size), mode="bicubic",
                             antialias=True, align_corners=False).clamp(-1, 1)

    def training_inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = batch["image"]
        if x0.shape[-1] != self.image_size:
            raise ValueError(f"upsampler UNet is {self.image_size} px but batch images are {x0.shape[-1]} px: set "
                             f"data.image_size={self.image_size} and data.lowres_size={self.lowres_size}")
        lowres = self.get_lowres(batch)
        b = x0.shape[0]
        level = None
        if train:
            lowres = self.corrupt(lowres)
            if self.noise_aug_max_level:
                level = torch.randint(0, self.noise_aug_max_level, (b,), device=x0.device)
        cond = self.lowres_cond(lowres, level)
        if self.residual:  # the target is what upsampling must add to the (corrupted) conditioning
            x0 = x0 - resize_lowres(lowres.float(), tuple(x0.shape[-2:])).to(x0.dtype)
        if train and self.train_crop_size < self.image_size:
            x0, cond["lowres_image"] = paired_random_crop(x0, cond["lowres_image"], self.train_crop_size)
        return x0, cond

    def sample_batch(self, batch: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        level = self.sample_noise_level if self.net.config.get("noise_level_cond") else None
        return upsample_images(self.net, self.diffusion, self.get_lowres(batch), self.image_size, self.sampler, level,
                               residual=self.residual, seeds=seeds)

    def val_rows(self, batch: dict[str, Any], samples: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, float]]:
        real = batch["image"].float()
        bicubic = bicubic_upsample(self.get_lowres(batch), self.image_size)
        metrics = {"psnr": float(psnr(samples, real).mean()), "psnr_bicubic": float(psnr(bicubic, real).mean())}
        metrics.update(shapes_metrics(samples, batch.get("meta")))
        return [bicubic, samples, real], metrics

    def system_metadata(self) -> dict[str, Any]:
        return {"sampler": self.sampler.to_dict(), "lowres_size": self.lowres_size,
                "sample_noise_level": self.sample_noise_level, "degradation": self.degradation,
                "noise_aug_max_level": self.noise_aug_max_level, "residual": self.residual}


def bicubic_upsample(lowres: torch.Tensor, size: int) -> torch.Tensor:
    """Plain bicubic upsampling to the target size, in [-1, 1]: the baseline an upsampler must beat."""
    return F.interpolate(lowres.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def shapes_metrics(images: torch.Tensor, metas: list[dict] | None) -> dict[str, float]:
    """ShapesEval on samples from the `shapes` dataset (else nothing): `shapes_<split>_<attribute>` for every
    attribute judged at this image size, and `shapes_acc_<split>` = all attributes right, where judged."""
    if not metas or not all(isinstance(m, dict) and "attributes" in m for m in metas):
        return {}
    from unclip.eval.shapes_eval import ShapesEval

    out = {}
    for key, value in ShapesEval()(images, metas).items():
        if key.startswith("n_") or (isinstance(value, float) and math.isnan(value)):
            continue
        split, attribute = key.split("/")
        out[f"shapes_acc_{split}" if attribute == "all" else f"shapes_{split}_{attribute}"] = float(value)
    return out
