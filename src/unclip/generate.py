"""Plain-torch sampling for each stage, shared by the systems' validation and by UnCLIPPipeline.

    sample_image_embeds  prior: caption encodings -> CLIP image embeddings, best of N candidates by the
                         dot product with the text embedding (Ramesh et al. 2022, sec. 2.2)
    sample_images        decoder / upsampler: conditioning -> images in [-1, 1], classifier-free guided
    upsampler_cond       the low-resolution conditioning an upsampler sees at inference
    upsample_images      upsampler: low-resolution images -> images, for full-image and residual upsamplers
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import guided_denoiser, make_generators, sample_loop

__all__ = ["SamplerConfig", "sample_image_embeds", "sample_images", "upsampler_cond", "upsample_images", "PRIOR_DROP",
           "DECODER_DROP", "rerank"]

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, int]] = set()

PRIOR_DROP = ("cond_drop_mask",)
DECODER_DROP = ("image_embed_drop_mask", "text_drop_mask")


@dataclass
class SamplerConfig:
    """How one stage is sampled. Keys match `conf/sampler/*.yaml` and the pipeline's per-stage options.

    name: scheduler ("ddim", "ddpm", "dpmpp", "unipc" or "diffusers.<Class>"); num_steps: scheduler steps;
    eta: DDIM noise (0 = deterministic); cond_scale: classifier-free guidance scale (1 = no guidance);
    thresholding: x_0 thresholding for images ("none", "static", "dynamic"); text_scale (decoder): the caption's
    own guidance scale given the image embedding, with cond_scale then the image embedding's (nested guidance,
    `guided_denoiser`); None: one scale for both, as the paper samples.
    """

    name: str = "ddim"
    num_steps: int = 64
    eta: float = 0.0
    cond_scale: float = 1.0
    thresholding: str = "none"
    text_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Scales and eta must be finite numbers (a quoted '10' or nan is refused here, before any sampling)."""
        for key in ("cond_scale", "eta", "text_scale"):
            value = getattr(self, key)
            if value is None and key == "text_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"sampler {key} must be a finite number, got {value!r}")
            setattr(self, key, float(value))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"sampler num_steps must be a whole number >= 1, got {self.num_steps!r}")

    @classmethod
    def from_any(cls, value: SamplerConfig | dict[str, Any] | None, **defaults: Any) -> SamplerConfig:
        if isinstance(value, SamplerConfig):
            return value
        merged = {**defaults, **{k: v for k, v in dict(value or {}).items() if v is not None}}
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def guidance(self, drop_mask_names: Sequence[str]) -> float | list[float]:
        """The guidance scale(s) for `guided_denoiser`: cond_scale, or with text_scale set and the caption's
        mask ("text_drop_mask") last of several, cond_scale for the others and text_scale for the caption."""
        if self.text_scale is None:
            return self.cond_scale
        caption = DECODER_DROP[-1]  # "text_drop_mask"
        if caption not in drop_mask_names:
            raise ValueError(f"text_scale guides the caption, but this stage samples without one (its guidance drops "
                             f"{list(drop_mask_names)}): unset text_scale")
        if len(drop_mask_names) < 2:
            return self.text_scale
        if drop_mask_names[-1] != caption:
            raise ValueError(f"text_scale guides the caption given the other conditions: its mask must come last, "
                             f"got {list(drop_mask_names)}")
        return [self.cond_scale] * (len(drop_mask_names) - 1) + [self.text_scale]

    def scheduler(self, diffusion: GaussianDiffusion):
        steps, total = int(self.num_steps), diffusion.num_timesteps
        if self.name == "ddim" and total % steps and (total, steps) not in _WARNED:
            _WARNED.add((total, steps))
            log.warning("DDIM with %d steps: diffusers' DDIM steps from t to t - %d, which is not always the next "
                        "timestep it evaluates when %d is not a multiple of the step count; a divisor (25, 40, 50, "
                        "125) or sampler dpmpp is exact", steps, total // steps, total)
        return diffusion.make_scheduler(self.name, thresholding=self.thresholding, **self.extra)


def rerank(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Keep, per caption, the candidate with the highest dot product with the text embedding.

    candidates (B, N, D) unit vectors, text_embed (B, D) -> (B, D).
    """
    with torch.autocast(candidates.device.type, enabled=False):  # near-ties must not be decided in bf16
        scores = torch.einsum("bnd,bd->bn", candidates.float(), F.normalize(text_embed.float(), dim=-1))
    best = scores.argmax(dim=1)  # (B,)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


@torch.no_grad()
def sample_image_embeds(
    net: torch.nn.Module,
    diffusion: GaussianDiffusion,
    normalizer: EmbedNormalizer,
    text_embed: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    sampler: SamplerConfig,
    num_candidates: int = 2,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Prior sampling: (B, D) text embeds, (B, L, W) tokens, (B, L) mask -> (B, D) unit image embeddings.

    Each caption gets `num_candidates` samples (its seed's generator draws them in turn); the one with the
    highest dot product with the caption's text embedding is kept.
    """
    b, n = text_embed.shape[0], max(1, int(num_candidates))
    device = text_embed.device
    cond = {
        "text_embed": F.normalize(text_embed.float(), dim=-1).repeat_interleave(n, 0),
        "text_tokens": text_tokens.float().repeat_interleave(n, 0),
        "text_mask": text_mask.repeat_interleave(n, 0),
    }
    gens = None
    if seeds is not None:
        per_caption = make_generators(seeds, device)
        gens = [g for g in per_caption for _ in range(n)]
    denoise = diffusion.as_prediction(guided_denoiser(net, cond, PRIOR_DROP, sampler.guidance(PRIOR_DROP)))
    x0 = sample_loop(denoise, (b * n, normalizer.embed_dim), sampler.scheduler(diffusion), sampler.num_steps,
                     generator=gens if gens is not None else generator, device=device, eta=sampler.eta,
                     progress=progress, desc="prior")
    candidates = normalizer.decode(x0).view(b, n, -1)
    return rerank(candidates, text_embed)


def upsampler_cond(lowres: torch.Tensor, image_size: int, diffusion: GaussianDiffusion | None = None,
                   noise_level: int | torch.Tensor | None = None, seeds: Sequence[int] | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """An upsampler's conditioning: the low-res image resized to the target size (as the UNet resizes it),
    then, for nets trained with noise augmentation, noised to `noise_level` at the target size and the level
    itself (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1). Training, validation, the pipeline and
    evaluation all build it here, so the net sees the same kind of noise everywhere.

    lowres (B, C, h, w) in [-1, 1] -> {"lowres_image": (B, C, S, S)[, "noise_level": (B,) long]}.
    Noise comes from per-sample `seeds` (reproducible per image) or `generator`.
    """
    from unclip.nets.unet import resize_lowres

    up = resize_lowres(lowres.float(), (image_size, image_size))
    if diffusion is None or noise_level is None:
        return {"lowres_image": up}
    b = up.shape[0]
    level = noise_level if isinstance(noise_level, torch.Tensor) else torch.full((b,), int(noise_level))
    level = level.to(device=up.device, dtype=torch.long)
    if seeds is not None:
        gens = make_generators([int(s) + 17 for s in seeds], up.device)
        noise = torch.stack([torch.randn(up.shape[1:], generator=g, device=up.device) for g in gens])
    else:
        noise = torch.randn(up.shape, generator=generator, device=up.device)
    return {"lowres_image": diffusion.q_sample(up, level, noise), "noise_level": level}


@torch.no_grad()
def sample_images(
    net: torch.nn.Module,
    diffusion: GaussianDiffusion,
    cond: dict[str, Any],
    shape: Sequence[int],
    sampler: SamplerConfig,
    drop_mask_names: Sequence[str] = DECODER_DROP,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "decoder",
    value_range: float = 1.0,
) -> torch.Tensor:
    """Decoder / upsampler sampling: conditioning tensors -> images (B, C, H, W) clamped to [-value_range,
    value_range] ([-1, 1] for images; a residual upsampler's residuals span [-2, 2])."""
    device = next(iter(v for v in cond.values() if isinstance(v, torch.Tensor))).device if cond else "cpu"
    if x_T is not None:
        device = x_T.device
    gens = make_generators(seeds, device) if seeds is not None else generator
    denoise = diffusion.as_prediction(guided_denoiser(net, cond, drop_mask_names, sampler.guidance(drop_mask_names)))
    x = sample_loop(denoise, shape, sampler.scheduler(diffusion), sampler.num_steps, generator=gens,
                    device=device, x_T=x_T, eta=sampler.eta, progress=progress, desc=desc)
    return x.clamp(-value_range, value_range)


@torch.no_grad()
def upsample_images(
    net: torch.nn.Module,
    diffusion: GaussianDiffusion,
    lowres: torch.Tensor,
    image_size: int,
    sampler: SamplerConfig,
    noise_level: int | None = None,
    residual: bool = False,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "upsampler",
) -> torch.Tensor:
    """Upsampler sampling: low-resolution images (B, C, h, w) in [-1, 1] -> (B, C, S, S), S = image_size.

    noise_level: the augmentation level the net is told its conditioning carries (nets with noise_level_cond;
    None otherwise). residual: the net samples the difference from the resized low-resolution image (SRDiff,
    Li et al. 2022), which is added back here. Training, validation, the pipeline and evaluation all
    upsample through this function.
    """
    from unclip.nets.unet import resize_lowres

    cond = upsampler_cond(lowres, image_size, diffusion if noise_level is not None else None, noise_level,
                          seeds=seeds)
    shape = (lowres.shape[0], lowres.shape[1], image_size, image_size)
    out = sample_images(net, diffusion, cond, shape, sampler, (), seeds=seeds, progress=progress, desc=desc,
                        value_range=2.0 if residual else 1.0)
    if residual:
        out = (resize_lowres(lowres.float(), (image_size, image_size)) + out).clamp(-1, 1)
    return out
