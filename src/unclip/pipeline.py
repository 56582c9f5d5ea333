"""UnCLIPPipeline: plain-torch inference across stages (Ramesh et al. 2022), built from stage checkpoints.

    text_to_image   captions -> CLIP text encodings -> prior -> image embeddings -> decoder (64 px)
                    -> upsampler(s) (256 px, 1024 px); `stop_at` ends early (64 px previews)
    variations      image -> CLIP image embedding -> decoder from the DDIM-inverted latent with eta > 0
                    (sec. 3.1; `invert=False` starts from fresh noise instead)
    interpolate     slerp between two image embeddings (of images or prompts) with the decoder noise fixed
                    (sec. 3.2)
    text_diff       move an image's embedding towards normalize(z_t(target) - z_t(source)) by slerp with
                    theta in [0, 0.5], decoding from the image's DDIM-inverted latent to keep its layout (sec. 3.3)

Checkpoints load strictly with `weights_only=True`; the EMA weights they hold are what runs. The CLIP encoder
is rebuilt from the identity the stages recorded (or given), and every stage's recorded identity must match
it. Samplers per stage: `SamplerConfig` (scheduler, steps, eta, guidance scale, thresholding).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unclip.checkpoint import build_net, clip_mismatch, load_stage_checkpoint, net_state_dict
from unclip.clip.encoder import ClipEncoder
from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import ddim_invert, guided_denoiser
from unclip.generate import PRIOR_DROP, SamplerConfig, sample_image_embeds, sample_images, upsample_images
from unclip.nets.unet import UNet, conv_memory_format

log = logging.getLogger(__name__)

__all__ = ["UnCLIPPipeline", "LoadedStage", "slerp", "clip_from_identity", "check_clip_identity"]

STAGE_SEED_OFFSET = {"prior": 0, "decoder": 1_000_003, "upsampler": 2_000_006, "upsampler_1024": 3_000_009}


def slerp(a: torch.Tensor, b: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (..., D) at weight w in [0, 1]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    w = torch.as_tensor(w, dtype=a.dtype, device=a.device)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / so
    linear = (1 - w) * a + w * b  # nearly parallel vectors: slerp == lerp
    return F.normalize(torch.where(so.abs() < 1e-6, linear, out), dim=-1)


@dataclass
class LoadedStage:
    """A stage rebuilt from its checkpoint: net (EMA weights), diffusion, metadata and default sampler."""

    name: str
    net: torch.nn.Module
    diffusion: GaussianDiffusion
    meta: dict[str, Any]
    path: str
    sha256: str
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    @classmethod
    def load(cls, path: str | Path, stage: str, name: str | None = None) -> LoadedStage:
        ckpt = load_stage_checkpoint(path, expected_stage=stage)
        meta = ckpt["unclip"]
        net = build_net(meta["net"])
        net.load_state_dict(net_state_dict(ckpt["state_dict"]), strict=True)
        net.eval().requires_grad_(False)
        diffusion = GaussianDiffusion.from_config(meta["diffusion"])
        sampler = SamplerConfig.from_any(meta.get("system", {}).get("sampler"))
        return cls(name or stage, net, diffusion, meta, str(path), ckpt["file_sha256"], sampler)

    def to(self, device: torch.device | str) -> LoadedStage:
        """Move to `device`; a UNet's conv weights take that device's layout (`conv_memory_format`), as in
        training, so its convolutions run channels_last on a GPU."""
        self.net.to(device)
        if isinstance(self.net, UNet):
            self.net.to(memory_format=conv_memory_format(device))
        self.diffusion.to(device)
        return self


def clip_from_identity(identity: dict[str, Any]) -> ClipEncoder:
    """Rebuild the frozen CLIP encoder a stage was trained with from the identity it recorded."""
    if identity.get("checkpoint"):
        return ClipEncoder(checkpoint=identity["checkpoint"])
    if identity.get("architecture"):
        return ClipEncoder(architecture=identity["architecture"], init_seed=identity.get("init_seed") or 0)
    return ClipEncoder(model_name=identity["model_name"], pretrained=identity.get("pretrained"),
                       init_seed=identity.get("init_seed") or 0)


def check_clip_identity(clip: ClipEncoder, stages: Sequence[LoadedStage]) -> None:
    """Every stage must have been trained against this CLIP (same weights hash and embedding size)."""
    for stage in stages:
        why = clip_mismatch(stage.meta.get("clip"), clip.identity)
        if why:
            raise ValueError(f"CLIP mismatch: the {stage.name} checkpoint {stage.path} was trained with a CLIP whose "
                             f"{why}; all stages must share one CLIP. If a CLIP checkpoint was moved or overwritten "
                             "since, pass the one the stages were trained with: pipeline.clip='{_target_: "
                             "unclip.clip.encoder.ClipEncoder, checkpoint: PATH}' (evaluate.py ckpt=...: clip=...)")


class UnCLIPPipeline:
    """The unCLIP generator. Build with `from_checkpoints`; call `text_to_image` and the manipulations.

    Args:
        clip: frozen CLIP encoder; prior / decoder / upsamplers: loaded stages (prior and upsamplers optional).
        device: where sampling runs. precision: "bf16" (autocast on CUDA) or "fp32".
        offload: keep every stage on the CPU and move only the one sampling to the device (small GPUs).
    """

    def __init__(self, clip: ClipEncoder, decoder: LoadedStage, prior: LoadedStage | None = None,
                 upsamplers: Sequence[LoadedStage] = (), device: str | torch.device = "cpu",
                 precision: str = "fp32", offload: bool = False) -> None:
        self.clip, self.prior, self.decoder, self.upsamplers = clip, prior, decoder, list(upsamplers)
        self.device = torch.device(device)
        self.precision = precision
        self.offload = offload
        stages = [s for s in (prior, decoder, *self.upsamplers) if s is not None]
        check_clip_identity(clip, stages)
        self.normalizer = None
        if prior is not None:
            stats = prior.meta.get("embed_stats") or {}
            self.normalizer = EmbedNormalizer(prior.net.config["embed_dim"],
                                              prior.meta["system"].get("embed_norm", "l2"),
                                              stats.get("mean"), stats.get("std"))
        self.clip.to(self.device)
        for stage in stages:
            stage.to("cpu" if offload else self.device)
        if self.normalizer is not None:
            self.normalizer.to(self.device)

    @classmethod
    def from_checkpoints(cls, decoder: str | Path, prior: str | Path | None = None,
                         upsamplers: Sequence[str | Path] | str | Path | None = None,
                         clip: ClipEncoder | None = None, device: str = "auto", precision: str = "auto",
                         offload: bool = False, compile: bool = False) -> UnCLIPPipeline:
        if isinstance(upsamplers, (str, Path)):
            upsamplers = [upsamplers]
        dec = LoadedStage.load(decoder, "decoder")
        pri = LoadedStage.load(prior, "prior") if prior else None
        ups = [LoadedStage.load(p, "upsampler") for p in upsamplers or []]
        for stage in ups[1:]:  # "upsampler", then "upsampler_<size>" (e.g. upsampler_1024)
            stage.name = f"upsampler_{stage.net.config['image_size']}"
        for a, b in zip([dec, *ups], ups):
            size_a, low_b = a.net.config["image_size"], b.meta["system"].get("lowres_size")
            if low_b is not None and low_b != size_a:
                raise ValueError(f"{b.path} upsamples from {low_b} px but the stage before it ({a.path}) "
                                 f"makes {size_a} px images")
        if clip is None:
            recorded = (pri or dec).meta.get("clip")
            if not recorded:
                raise ValueError("no CLIP identity recorded in the checkpoints: pass a CLIP encoder")
            clip = clip_from_identity(recorded)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if precision == "auto":
            precision = "bf16" if str(device).startswith("cuda") else "fp32"
        pipe = cls(clip, dec, pri, ups, device=device, precision=precision, offload=offload)
        if compile:
            for stage in (pri, dec, *ups):
                if stage is not None:
                    stage.net.compile()
        return pipe

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _on_device(self, stage: LoadedStage):
        """Autocast for bf16, and with offload the stage's net visits the device only while it samples."""
        if self.offload:
            stage.to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.precision == "bf16" else contextlib.nullcontext())
        try:
            with autocast:
                yield stage
        finally:
            if self.offload:
                stage.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def checkpoint_hashes(self) -> dict[str, str]:
        stages = [s for s in (self.prior, self.decoder, *self.upsamplers) if s is not None]
        return {s.name: s.sha256 for s in stages} | {"clip": self.clip.identity["weights_sha256"]}

    @staticmethod
    def stage_seeds(seeds: Sequence[int], stage: str) -> list[int]:
        return [int(s) + STAGE_SEED_OFFSET.get(stage, 0) for s in seeds]

    def encode_text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        for p in prompts:
            if not p or not p.strip():
                raise ValueError("empty prompt: every prompt needs some text")
        enc = self.clip.encode_text(list(prompts))
        return {k: v if v.dtype == torch.bool else v.float() for k, v in enc.items()}

    def decoder_cond(self, image_embed: torch.Tensor, text: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """The decoder's conditioning for image embeddings (B, D) and encoded captions (`clip.encode_text`; None:
        the null caption in both guidance branches)."""
        cond: dict[str, Any] = {"image_embed": F.normalize(image_embed.float(), dim=-1)}
        if self.decoder.meta["system"].get("use_text"):
            if text is not None:
                cond.update(text_tokens=text["text_tokens"], text_mask=text["text_mask"])
            else:  # no caption: the null caption, in both guidance branches
                b = image_embed.shape[0]
                cond["text_drop_mask"] = torch.ones(b, dtype=torch.bool, device=image_embed.device)
        return cond

    def _drops(self) -> tuple[str, ...]:
        return tuple(self.decoder.meta["system"].get("drop_masks", ["image_embed_drop_mask"]))

    def _image_shape(self, stage: LoadedStage, batch: int) -> tuple[int, int, int, int]:
        cfg = stage.net.config
        channels = cfg.get("out_channels", 3) // (2 if stage.diffusion.learn_sigma else 1)  # less the variance
        return (batch, channels, cfg["image_size"], cfg["image_size"])

    # ------------------------------------------------------------------ stages
    def sample_prior(self, text: dict[str, torch.Tensor], seeds: Sequence[int], sampler: SamplerConfig | None = None,
                     num_candidates: int | None = None, progress: bool = False) -> torch.Tensor:
        if self.prior is None:
            raise ValueError("this pipeline has no prior: pass prior=<prior checkpoint> for text-to-image")
        sampler = sampler or self.prior.sampler
        n = num_candidates or self.prior.meta["system"].get("num_candidates", 2)
        with self._on_device(self.prior) as stage:
            return sample_image_embeds(stage.net, stage.diffusion, self.normalizer, text["text_embed"],
                                       text["text_tokens"], text["text_mask"], sampler, n,
                                       seeds=self.stage_seeds(seeds, "prior"), progress=progress)

    def decode(self, image_embed: torch.Tensor, text: dict[str, torch.Tensor] | None, seeds: Sequence[int],
               sampler: SamplerConfig | None = None, x_T: torch.Tensor | None = None,
               progress: bool = False) -> torch.Tensor:
        """Image embeddings (B, D) (+ caption encodings) -> 64 px images (B, 3, 64, 64) in [-1, 1]."""
        sampler = sampler or self.decoder.sampler
        cond = self.decoder_cond(image_embed, text)
        with self._on_device(self.decoder) as stage:
            return sample_images(stage.net, stage.diffusion, cond, self._image_shape(stage, len(seeds)), sampler,
                                 self._drops(), seeds=self.stage_seeds(seeds, "decoder"), x_T=x_T,
                                 progress=progress, desc="decoder")

    def upsample(self, images: torch.Tensor, seeds: Sequence[int], samplers: Sequence[SamplerConfig | None] = (),
                 progress: bool = False, count: int | None = None) -> list[torch.Tensor]:
        """Run the first `count` upsamplers (all by default) in turn; returns each one's output."""
        outs = []
        for i, stage in enumerate(self.upsamplers[:count]):
            sampler = (samplers[i] if i < len(samplers) else None) or stage.sampler
            system = stage.meta["system"]
            stage_name = "upsampler" if i == 0 else "upsampler_1024"  # seed offsets
            level = int(system.get("sample_noise_level", 0)) if stage.net.config.get("noise_level_cond") else None
            with self._on_device(stage) as s:
                images = upsample_images(s.net, s.diffusion, images, s.net.config["image_size"], sampler, level,
                                         residual=bool(system.get("residual", False)),
                                         seeds=self.stage_seeds(seeds, stage_name), progress=progress,
                                         desc=stage.name)
            outs.append(images)
        return outs

    def resolve_samplers(self, prior_sampler: SamplerConfig | dict | None = None,
                         decoder_sampler: SamplerConfig | dict | None = None,
                         upsampler_samplers: Sequence[SamplerConfig | dict | None] = ()) -> dict[str, SamplerConfig]:
        """The sampler each stage runs with: the given settings over its checkpoint's own. Keys: "prior" (when
        the pipeline has one), "decoder" and each upsampler's name; `upsampler_samplers` is in upsampler order."""
        out = {"prior": SamplerConfig.from_any(prior_sampler, **self.prior.sampler.to_dict())} if self.prior else {}
        out["decoder"] = SamplerConfig.from_any(decoder_sampler, **self.decoder.sampler.to_dict())
        if "prior" in out:
            out["prior"].guidance(PRIOR_DROP)  # settings a stage cannot honour are refused before any sampling
        out["decoder"].guidance(self._drops())
        given = list(upsampler_samplers) + [None] * len(self.upsamplers)
        for u, stage in zip(given, self.upsamplers):
            out[stage.name] = SamplerConfig.from_any(u, **stage.sampler.to_dict())
        return out

    # ------------------------------------------------------------------ text to image
    @torch.no_grad()
    def text_to_image(self, prompts: Sequence[str], seeds: Sequence[int] | None = None, *,
                      prior_sampler: SamplerConfig | dict | None = None,
                      decoder_sampler: SamplerConfig | dict | None = None,
                      upsampler_samplers: Sequence[SamplerConfig | dict | None] = (),
                      num_candidates: int | None = None, stop_at: str | None = None, batch_size: int = 16,
                      progress: bool = False) -> dict[str, Any]:
        """Captions -> {"image_embed": (N, D), "decoder": (N, 3, 64, 64), "upsampler": ..., "images": final}.

        seeds: one per prompt (default 0..N-1); the same seed gives the same image on the same device.
        stop_at: "prior", "decoder" or an upsampler's name ("upsampler", "upsampler_1024") ends the pipeline
        after that stage.
        """
        names = [s.name for s in self.upsamplers]
        if stop_at not in (None, "prior", "decoder", *names):
            raise ValueError(f"stop_at must be one of prior, decoder, {', '.join(names) or '(no upsamplers)'}; "
                             f"got {stop_at!r}")
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        resolved = self.resolve_samplers(prior_sampler, decoder_sampler, upsampler_samplers)
        prior_cfg, dec_cfg = resolved.get("prior"), resolved["decoder"]
        up_cfgs = [resolved[s.name] for s in self.upsamplers]
        n_up = len(self.upsamplers) if stop_at is None else (names.index(stop_at) + 1 if stop_at in names else 0)
        out: dict[str, list[torch.Tensor]] = {"image_embed": [], "decoder": []}
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            text = {k: v.to(self.device) for k, v in self.encode_text(chunk).items()}
            embeds = self.sample_prior(text, chunk_seeds, prior_cfg, num_candidates, progress)
            out["image_embed"].append(embeds.cpu())
            if stop_at == "prior":
                continue
            images = self.decode(embeds, text, chunk_seeds, dec_cfg, progress=progress)
            out["decoder"].append(images.cpu())
            if n_up:
                ups = self.upsample(images, chunk_seeds, up_cfgs, progress, count=n_up)
                for stage, up in zip(self.upsamplers, ups):
                    out.setdefault(stage.name, []).append(up.cpu())
        result: dict[str, Any] = {k: torch.cat(v) for k, v in out.items() if v}
        final = [k for k in ("decoder", *[s.name for s in self.upsamplers]) if k in result]
        result["images"] = result[final[-1]] if final else None
        return result

    # ------------------------------------------------------------------ manipulations
    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> unit CLIP image embeddings (B, D)."""
        return F.normalize(self.clip.encode_image(images.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, image_embed: torch.Tensor | None = None, num_steps: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """DDIM-invert images (resized to the decoder's size) into the decoder's x_T, conditioned on their
        embeddings without guidance (the paper's bipartite latent (z_i, x_T), sec. 3)."""
        if self.decoder.diffusion.prediction_type == "sample":
            raise ValueError("DDIM inversion needs an epsilon- or v-predicting decoder")
        size = self.decoder.net.config["image_size"]
        x = images.to(self.device).float()
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        z = self.image_embeds(images) if image_embed is None else image_embed
        cond = self.decoder_cond(z, None)
        with self._on_device(self.decoder) as stage:
            denoise = guided_denoiser(stage.net, cond, self._drops(), 1.0)
            return ddim_invert(denoise, x, stage.diffusion.config, num_steps or self.decoder.sampler.num_steps,
                               progress=progress)

    def _ddim(self, eta: float, num_steps: int | None, cond_scale: float | None,
              thresholding: str | None = None) -> SamplerConfig:
        """DDIM at the decoder's settings; decodes that start from an inverted latent pass thresholding="none"
        so they integrate the same ODE the inversion ran backwards."""
        base = self.decoder.sampler
        return SamplerConfig(name="ddim", num_steps=num_steps or base.num_steps, eta=eta,
                             cond_scale=base.cond_scale if cond_scale is None else cond_scale,
                             thresholding=base.thresholding if thresholding is None else thresholding)

    @torch.no_grad()
    def variations(self, images: torch.Tensor, num_variations: int = 4, seed: int = 0, eta: float = 1.0,
                   invert: bool = True, num_steps: int | None = None, cond_scale: float | None = None,
                   progress: bool = False) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_variations, 3, h, w) variations at the decoder's size.

        The decoder runs DDIM with eta > 0 on the image's CLIP embedding, from its inverted latent x_T
        (invert=True, the paper's method: eta = 0 would reconstruct the image) or from fresh noise.
        """
        z = self.image_embeds(images)
        b = z.shape[0]
        x_T = self.invert(images, z, num_steps, progress) if invert else None
        outs = []
        for j in range(num_variations):
            seeds = [seed + 7919 * j + i for i in range(b)]
            sampler = self._ddim(eta, num_steps, cond_scale, "none" if invert else None)
            outs.append(self.decode(z, None, seeds, sampler, x_T=x_T, progress=progress))
        return torch.stack(outs, dim=1)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor | str, b: torch.Tensor | str, num_frames: int = 8, seed: int = 0,
                    num_steps: int | None = None, cond_scale: float | None = None,
                    progress: bool = False, prior_sampler: SamplerConfig | None = None,
                    num_candidates: int | None = None) -> dict[str, torch.Tensor]:
        """Frames between two images (3, H, W) or two prompts: slerp of their image embeddings, decoder noise
        fixed (sec. 3.2). Returns {"image_embed": (F, D), "images": (F, 3, h, w)}; frame 0 and frame F-1
        carry exactly the two inputs' embeddings. A prompt's embedding is the prior's (`prior_sampler` and
        `num_candidates`: as `sample_prior`)."""
        if num_frames < 2:
            raise ValueError(f"an interpolation needs at least 2 frames (its two ends), got {num_frames}")
        za, zb = (self._embed_of(x, seed, prior_sampler, num_candidates) for x in (a, b))
        weights = torch.linspace(0, 1, num_frames, device=self.device)
        z = torch.stack([slerp(za, zb, w) for w in weights])
        z[0], z[-1] = za, zb
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x_T = torch.randn(self._image_shape(self.decoder, 1), device=self.device, generator=gen)
        x_T = x_T.expand(num_frames, -1, -1, -1)  # the same decoder noise for every frame
        images = self.decode(z, None, [seed] * num_frames, self._ddim(0.0, num_steps, cond_scale), x_T=x_T,
                             progress=progress)
        return {"image_embed": z.cpu(), "images": images.cpu()}

    def _embed_of(self, x: torch.Tensor | str, seed: int, sampler: SamplerConfig | None = None,
                  num_candidates: int | None = None) -> torch.Tensor:
        if isinstance(x, str):
            text = {k: v.to(self.device) for k, v in self.encode_text([x]).items()}
            return self.sample_prior(text, [seed], sampler, num_candidates)[0]
        return self.image_embeds(x[None] if x.ndim == 3 else x)[0]

    @torch.no_grad()
    def text_diff(self, image: torch.Tensor, source: str, target: str, thetas: Sequence[float] = (0.0, 0.25, 0.5),
                  num_steps: int | None = None, cond_scale: float | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
        """Edit an image (3, H, W) towards `target` from `source` (sec. 3.3).

        z_d = normalize(z_t(target) - z_t(source)); z_theta = slerp(z_i, z_d, theta); each z_theta is decoded
        with DDIM (eta = 0) from the image's inverted latent, so theta = 0 is the inversion's reconstruction.
        Returns {"image_embed": (T, D), "images": (T, 3, h, w)}.
        """
        if any(not 0.0 <= t <= 1.0 for t in thetas):
            raise ValueError(f"thetas must lie in [0, 1] (the paper uses up to 0.5), got {list(thetas)}")
        image = image[None] if image.ndim == 3 else image
        z_i = self.image_embeds(image)  # (1, D)
        x_T = self.invert(image, z_i, num_steps, progress)
        enc = self.encode_text([source, target])
        text = F.normalize(enc["text_embed"].float(), dim=-1)  # directions, whatever the captions' norms
        diff = F.normalize(text[1] - text[0], dim=-1).to(self.device)
        z = torch.stack([slerp(z_i[0], diff, t) if t > 0 else z_i[0] for t in thetas])
        n = len(thetas)
        sampler = self._ddim(0.0, num_steps, 1.0 if cond_scale is None else cond_scale, "none")
        images = self.decode(z, None, [0] * n, sampler, x_T=x_T.expand(n, -1, -1, -1), progress=progress)
        return {"image_embed": z.cpu(), "images": images.cpu()}

