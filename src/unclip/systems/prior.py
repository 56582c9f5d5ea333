"""The diffusion prior stage: CLIP text encodings -> CLIP image embedding (Ramesh et al. 2022, sec. 2.2).

Training: x_0 = the caption's image embedding scaled into the prior's space (EmbedNormalizer), a draw of t and
eps, and the net's prediction (x_0 by default) regressed with MSE. With probability `cond_drop_prob` a sample's
text conditioning is replaced by the learned null (classifier-free guidance).

Validation (EMA weights): `val/loss`, and on sampled embeddings
    val/prior_cosine         cos(sampled, true image embedding)
    val/text_cosine          cos(text embedding, true image embedding): the baseline the prior must beat
    val/unrelated_cosine     cos(sampled, another caption's image embedding): must stay low
    val/prior_retrieval_top1 sampled embedding retrieves its own image among up to 100 distinct captions
    val/text_retrieval_top1  the same for the caption's text embedding: the retrieval baseline
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from unclip.clip.encoder import ClipEncoder
from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.eval.retrieval import grouped_recall
from unclip.generate import PRIOR_DROP, SamplerConfig, sample_image_embeds
from unclip.systems.base import StageSystem, net_for_clip, plain

__all__ = ["PriorSystem"]

CLIP_FIELDS = ("text_embed", "text_tokens", "text_mask", "image_embed")
PRIOR_WIDTHS = {"embed_dim": "embed_dim", "text_token_dim": "token_dim", "num_text_tokens": "context_length"}


class PriorSystem(StageSystem):
    """LightningModule of the prior.

    Args:
        net: a PriorTransformer (its embed_dim and text_token_dim must match the CLIP encoder), or a partial of
            one: the widths it leaves None (embed_dim, text_token_dim, num_text_tokens) come from the CLIP.
        diffusion: the forward process and loss (x_0 prediction, cosine schedule by default).
        clip: the frozen CLIP encoder (needed for captions without precomputed embeddings, and for identity).
        cond_drop_prob: probability of dropping the text conditioning in training.
        embed_norm: "l2" or "standardize" (needs `embed_stats`, the precompute's embed_stats.json).
        embed_stats: path of the embedding statistics file.
        sampler: validation / default sampling settings (SamplerConfig keys).
        num_candidates: prior samples per caption; the best by text similarity is kept.
        optimizer, warmup_steps, lr_decay, min_lr_ratio, compile: see StageSystem.
    """

    stage = "prior"

    def __init__(
        self,
        net: torch.nn.Module | Callable[..., torch.nn.Module],
        diffusion: GaussianDiffusion,
        clip: ClipEncoder | None = None,
        cond_drop_prob: float = 0.1,
        embed_norm: str = "l2",
        embed_stats: str | None = None,
        sampler: dict[str, Any] | None = None,
        num_candidates: int = 2,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 1000,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool | str = False,
    ) -> None:
        super().__init__(clip, optimizer, warmup_steps, lr_decay, min_lr_ratio, compile)
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if diffusion.learn_sigma:
            raise ValueError("the prior predicts x_0 of an embedding: diffusion.learn_sigma is for image stages")
        net = net_for_clip(net, clip, PRIOR_WIDTHS)
        self.net = net
        self.diffusion = diffusion
        embed_dim = net.config["embed_dim"]
        if clip is not None and clip.embed_dim != embed_dim:
            raise ValueError(f"prior embed_dim={embed_dim} but the CLIP encoder embeds to {clip.embed_dim} dims")
        if clip is not None and clip.token_dim is not None and clip.token_dim != net.config["text_token_dim"]:
            raise ValueError(f"prior text_token_dim={net.config['text_token_dim']} but the CLIP encoder's tokens "
                             f"are {clip.token_dim}-d")
        stats = json.loads(open(embed_stats).read()) if embed_stats else {}
        stats_clip = (stats.get("clip") or {}).get("weights_sha256")
        if clip is not None and stats_clip and stats_clip != clip.identity["weights_sha256"]:
            raise ValueError(f"{embed_stats} was computed with a different CLIP (weights_sha256 {stats_clip[:12]}...) "
                             f"than this prior's ({clip.identity['weights_sha256'][:12]}...)")
        self.normalizer = EmbedNormalizer(embed_dim, embed_norm, stats.get("image_embed_mean"),
                                          stats.get("image_embed_std"))
        self.cond_drop_prob = cond_drop_prob
        self.sampler = SamplerConfig.from_any(sampler, name="ddim", num_steps=64)
        self.num_candidates = num_candidates
        self.save_hyperparameters(ignore=["net", "diffusion", "clip", "optimizer"])
        self._val: dict[str, list] = {}

    # ------------------------------------------------------------------ training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.net(x_t, t, **cond)

    def conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x_0 (B, D) in the prior's space, net conditioning)."""
        f = self.clip_features(batch, CLIP_FIELDS)
        cond = {"text_embed": F.normalize(f["text_embed"], dim=-1), "text_tokens": f["text_tokens"],
                "text_mask": f["text_mask"]}
        return self.normalizer.encode(f["image_embed"]), cond

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, cond = self.conditioning(batch)
        cond["cond_drop_mask"] = self.drop_mask(x0.shape[0], self.cond_drop_prob)
        loss = self.diffusion.training_losses(self.train_net, x0, on_inputs=self.measure_flops, **cond)["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"sampled": [], "image": [], "text": [], "captions": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, cond = self.conditioning(batch)
        b = x0.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=self.device, generator=gen)
        noise = torch.randn(x0.shape, device=self.device, generator=gen)
        loss = self.diffusion.training_losses(self.net, x0, t=t, noise=noise, **cond)["loss"].mean()
        self.log("val/loss", loss, sync_dist=True, batch_size=b)
        sampled = sample_image_embeds(self.net, self.diffusion, self.normalizer, cond["text_embed"],
                                      cond["text_tokens"], cond["text_mask"], self.sampler, self.num_candidates,
                                      seeds=[batch_idx * 100_000 + i for i in range(b)])
        true = self.normalizer.decode(x0)
        self._val["sampled"].append(sampled)
        self._val["image"].append(true)
        self._val["text"].append(cond["text_embed"])
        self._val["captions"].extend(batch["caption"])

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("sampled"):
            return
        metrics = embedding_metrics(torch.cat(self._val["sampled"]), torch.cat(self._val["image"]),
                                    torch.cat(self._val["text"]), self._val["captions"])
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._val = {}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int] | None = None, **sampler: Any) -> torch.Tensor:
        """Captions -> (B, D) unit CLIP image embeddings with this system's weights."""
        enc = self.clip.encode_text(captions)
        cfg = SamplerConfig.from_any({**self.sampler.to_dict(), **sampler})
        return sample_image_embeds(self.net, self.diffusion, self.normalizer, enc["text_embed"].float(),
                                   enc["text_tokens"].float(), enc["text_mask"], cfg, self.num_candidates,
                                   seeds=seeds)

    def stage_metadata(self) -> dict[str, Any]:
        return {
            "net": self.net_metadata(),
            "diffusion": self.diffusion.config,
            "clip": self.clip.identity if self._clip.module is not None else None,
            "embed_stats": self.normalizer.stats(),
            "system": plain({"embed_norm": self.normalizer.mode, "cond_drop_prob": self.cond_drop_prob,
                             "sampler": self.sampler.to_dict(), "num_candidates": self.num_candidates,
                             "drop_masks": list(PRIOR_DROP)}),
        }


def embedding_metrics(sampled: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                      captions: list[str]) -> dict[str, float]:
    """Prior quality from unit vectors (N, D): sampled, true image and text embeddings, and the captions."""
    sampled, image, text = (F.normalize(x.float(), dim=-1) for x in (sampled, image, text))
    n = sampled.shape[0]
    metrics = {
        "prior_cosine": float((sampled * image).sum(-1).mean()),
        "text_cosine": float((text * image).sum(-1).mean()),
    }
    if n > 1:
        other = torch.roll(torch.arange(n), 1)
        distinct = torch.tensor([captions[i] != captions[j] for i, j in zip(range(n), other.tolist())])
        if distinct.any():
            metrics["unrelated_cosine"] = float((sampled * image[other]).sum(-1)[distinct].mean())
    recall = grouped_recall(sampled, image, captions, ks=(1, 5), group_size=100)
    if recall:
        metrics["prior_retrieval_top1"] = recall[1]
        metrics["prior_retrieval_top5"] = recall[5]
        baseline = grouped_recall(text, image, captions, ks=(1,), group_size=100)  # what the prior must beat
        metrics["text_retrieval_top1"] = baseline[1]
    return metrics
