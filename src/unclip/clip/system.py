"""Stage one: contrastive CLIP training (Radford et al. 2021), for users who train their own CLIP.

open_clip's ClipLoss with its learnable temperature; with several devices it gathers the features of every
rank (with gradients), so `trainer.devices=8` optimises the global-batch loss. Logs train/loss,
train/logit_scale and train/temperature; validation reports zero-shot retrieval recall@1/@5 in both
directions within groups of up to 100 pairs with distinct captions (val/t2i_r1, val/i2t_r5, ...), and on
`shapes` zero-shot classification of size, colour, shape and position by prompt ensembles over the caption
grammar (val/zeroshot_<attribute>, val/zeroshot_all; unclip.eval.zero_shot).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unclip.clip.encoder import ClipEncoder
from unclip.eval.retrieval import grouped_recall
from unclip.systems.base import StageSystem, plain
from unclip.utils.ranks import keys_on_every_rank

__all__ = ["ClipSystem"]


class ClipSystem(StageSystem):
    """LightningModule training an open_clip model contrastively.

    Args:
        encoder: a trainable ClipEncoder (trainable=True), from an architecture or a named model.
        local_loss: compute the loss only for the local rank's rows against all gathered features (saves
            memory at scale, same gradients when gather_with_grad is on).
        gather_with_grad: let gradients flow through the gathered features of other ranks.
        max_logit_scale: the logit scale is clamped to log(max_logit_scale) after each step (100 in CLIP).
        spatial_negatives: add a hard-negative term: each caption that names a direction gets a copy with its
            directions mirrored (unclip.data.text.spatial_negative), and the image must prefer its caption
            over that copy, a 2-way softmax at the CLIP temperature (train/negative_loss).
        swap_negatives: named word groups ({"colour": [red, green, ...], "shape": [circle|disk, square, ...]};
            each entry a class, synonyms joined by "|") for a second kind of hard negative in the same term: a
            caption with two words of different classes of one group exchanged ("a blue triangle beneath a
            green cross" -> "a green triangle beneath a blue cross"; unclip.data.text.swap_negative), so the
            CLIP must bind attributes to objects rather than encode a bag of words. Validation reports
            val/swap_<name> per group: how often an image prefers its caption over that swap.
        replace_negatives: named word groups, as swap_negatives, for a third kind in the same term: the caption
            with one word of a group replaced by another class's ("a small red star" -> "a small red circle";
            unclip.data.text.replace_negative), so an attribute that is hard to see (a shape a few pixels wide)
            is asked for at every step instead of waiting for in-batch look-alikes.
        swap_exclude: phrases a swap or replace negative must not bring in (e.g. held-out colour-shape pairs: met
            only as negatives, they would be learned as wrong before they are ever evaluated).
        negative_weight: the weight of that term.
        mirror_twins: fraction (at most 1/2) of each training batch replaced by mirrored twins of the rest: an
            image flipped on an axis its caption names a direction on, with the caption's direction words
            swapped to match ("a red star on the left" -> flipped image, "a red star on the right"). Each twin
            pair differs only in where things are, so the contrastive loss itself teaches position, in both
            directions (image -> text and text -> image), instead of waiting for rare in-batch look-alikes.
        mirror_axes: the axes twins may flip: "horizontal" (safe wherever left-right mirroring keeps the
            caption true) and "vertical" (only for data whose objects look the same upside down).
        no_vertical_words: captions with any of these words are never flipped vertically (e.g. "star",
            "triangle" on `shapes`, which point up).
        optimizer, warmup_steps, lr_decay, min_lr_ratio, compile: see StageSystem.
    """

    stage = "clip"

    def __init__(
        self,
        encoder: ClipEncoder,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        max_logit_scale: float = 100.0,
        spatial_negatives: bool = False,
        negative_weight: float = 1.0,
        swap_negatives: Mapping[str, Sequence[str]] | None = None,
        swap_exclude: Sequence[str] = (),
        replace_negatives: Mapping[str, Sequence[str]] | None = None,
        mirror_twins: float = 0.0,
        mirror_axes: tuple[str, ...] = ("horizontal",),
        no_vertical_words: tuple[str, ...] = (),
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 1000,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.0,
        compile: bool | str = False,
    ) -> None:
        super().__init__(None, optimizer, warmup_steps, lr_decay, min_lr_ratio, compile)
        if not encoder.trainable:
            raise ValueError("the clip stage trains its encoder: build it with trainable=True")
        self.encoder = encoder
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.max_logit_scale = max_logit_scale
        self.spatial_negatives = spatial_negatives
        self.negative_weight = negative_weight
        from unclip.data.text import word_classes

        self.swap_groups = {name: word_classes(group) for name, group in (plain(swap_negatives) or {}).items()}
        self.swap_exclude = [str(p) for p in plain(swap_exclude) or ()]
        self.replace_groups = {name: word_classes(group) for name, group in (plain(replace_negatives) or {}).items()}
        mirror_axes, no_vertical_words = (tuple([v] if isinstance(v, str) else plain(v))  # one word: one entry
                                          for v in (mirror_axes, no_vertical_words))
        if not 0.0 <= mirror_twins <= 0.5:
            raise ValueError(f"mirror_twins must be in [0, 0.5] (a twin needs an original), got {mirror_twins}")
        unknown = set(mirror_axes) - {"horizontal", "vertical"}
        if unknown:
            raise ValueError(f"mirror_axes must be 'horizontal' and/or 'vertical', got {sorted(unknown)}")
        self.mirror_twins, self.mirror_axes = mirror_twins, mirror_axes
        self.no_vertical_words = {w.lower() for w in no_vertical_words}
        self.loss_fn = self.val_loss_fn = None
        self.save_hyperparameters(ignore=["encoder", "optimizer"])
        self._val: dict[str, list] = {}

    def setup(self, stage: str) -> None:
        from open_clip.loss import ClipLoss

        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.loss_fn = ClipLoss(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                cache_labels=True, rank=rank, world_size=world)
        # Validation batches differ between ranks (finite shards, a partial last batch): no gathering there;
        # the logged value is averaged over ranks instead.
        self.val_loss_fn = ClipLoss(cache_labels=False)
        if stage == "fit":
            self.compile_for_training(self.encoder.model)

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit image and text features (B, D) and the logit scale exp(s)."""
        compiled = self.__dict__.get("_train_net")  # a FrozenRef (StageSystem.compile_for_training)
        model = compiled.module if self.training and compiled is not None else self.encoder.model
        images = self.encoder.preprocess(batch.get("clip_image", batch["image"]))
        tokens = self.encoder.tokenize(batch["caption"]).to(self.device)
        out = model(images, tokens)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    def with_mirror_twins(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its last `mirror_twins` fraction of rows replaced by mirrored twins of the first rows
        (row j of the tail twins row j of the head); a row whose source names no flippable direction is kept.
        Images (B, 3, H, W) are flipped on the device; only the captions are touched on the host."""
        from unclip.data.text import mirror_caption, spatial_axes

        key = "clip_image" if "clip_image" in batch else "image"
        images, captions = batch[key], list(batch["caption"])
        b = len(captions)
        n = int(b * self.mirror_twins)
        rows, sources, dims = [], [], []
        for j, i in zip(range(b - n, b), range(n)):
            axes = [a for a in spatial_axes(captions[i]) if a in self.mirror_axes]
            words = set(re.findall(r"[a-z]+", captions[i].lower()))
            if "vertical" in axes and words & self.no_vertical_words:
                axes.remove("vertical")
            if not axes:
                continue
            axis = axes[int(random.random() * len(axes))]  # `random` is seeded per rank and step
            captions[j] = mirror_caption(captions[i], [axis])
            rows.append(j), sources.append(i), dims.append(-1 if axis == "horizontal" else -2)
        if not rows:
            return batch
        images = images.clone()
        for dim in (-1, -2):
            pick = [(j, i) for j, i, d in zip(rows, sources, dims) if d == dim]
            if pick:
                dst = torch.tensor([j for j, _ in pick], device=images.device)
                src = torch.tensor([i for _, i in pick], device=images.device)
                images[dst] = images[src].flip(dim)
        return {**batch, key: images, "caption": captions}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.mirror_twins:
            batch = self.with_mirror_twins(batch)
        image_f, text_f, scale = self.features(batch)
        loss = self.loss_fn(image_f, text_f, scale)
        b = image_f.shape[0]
        if self.spatial_negatives or self.swap_groups or self.replace_groups:
            negative = self.negative_loss(batch["caption"], image_f, text_f, scale)
            if negative is not None:
                self.log("train/negative_loss", negative, batch_size=b)
                loss = loss + self.negative_weight * negative
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/logit_scale", scale, batch_size=b)
        self.log("train/temperature", 1.0 / scale, batch_size=b)
        return loss

    def hard_negatives(self, caption: str, rng: random.Random) -> list[str]:
        """The configured hard negatives of one caption: its mirrored copy (spatial_negatives), an attribute
        swap (swap_negatives) and an attribute replaced (replace_negatives), each where the caption allows one."""
        from unclip.data.text import replace_negative, spatial_negative, swap_negative

        negatives = [spatial_negative(caption, rng)] if self.spatial_negatives else []
        if self.swap_groups:
            negatives.append(swap_negative(caption, list(self.swap_groups.values()), rng, self.swap_exclude))
        if self.replace_groups:
            negatives.append(replace_negative(caption, list(self.replace_groups.values()), rng, self.swap_exclude))
        return [n for n in negatives if n is not None]

    def negative_loss(self, captions: list[str], image_f: torch.Tensor, text_f: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor | None:
        """Mean 2-way cross-entropy of (image . caption, image . hard negative) * scale over every (caption, hard
        negative) pair of `hard_negatives`; None when no caption has one. image_f, text_f: (B, D) unit features."""
        pairs = [(i, n) for i, c in enumerate(captions) for n in self.hard_negatives(c, random)]  # `random` is
        if not pairs:                                                                    # seeded per rank and step
            return None
        tokens = self.encoder.tokenize([n for _, n in pairs]).to(self.device)
        negative_f = self.encoder.model.encode_text(tokens, normalize=True)
        index = torch.tensor([i for i, _ in pairs], device=image_f.device)
        images = image_f.index_select(0, index)
        logits = scale * torch.stack([(images * text_f.index_select(0, index)).sum(-1),
                                      (images * negative_f).sum(-1)], dim=1)
        return F.cross_entropy(logits.float(), torch.zeros(len(pairs), dtype=torch.long, device=logits.device))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # as in CLIP: the scale stays at most 100
            self.encoder.model.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "captions": [], "metas": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_f, text_f, scale = self.features(batch)
        self.log("val/loss", self.val_loss_fn(image_f, text_f, scale), sync_dist=True, batch_size=image_f.shape[0])
        self._val["image"].append(image_f.float())
        self._val["text"].append(text_f.float())
        self._val["captions"].extend(batch["caption"])
        self._val["metas"].extend(batch.get("meta") or [{}] * image_f.shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("image"):
            return
        image, text = torch.cat(self._val["image"]), torch.cat(self._val["text"])
        captions, metas = self._val["captions"], self._val["metas"]
        metrics: dict[str, float] = {}
        for name, (q, k) in {"t2i": (text, image), "i2t": (image, text)}.items():
            for kk, value in grouped_recall(q, k, captions, ks=(1, 5), group_size=100).items():
                metrics[f"{name}_r{kk}"] = value
        if metas and all("attributes" in m for m in metas):
            from unclip.eval.zero_shot import shapes_zero_shot

            metrics.update(shapes_zero_shot(self.encoder, image, metas))
        if self.swap_groups:
            from unclip.eval.zero_shot import swap_binding

            binding = swap_binding(self.encoder, image, captions, self.swap_groups)
            metrics.update({k: v for k, v in binding.items() if not k.endswith("_n")})
        # each rank scored its own images: average only what every rank has (a rank without two-object captions
        # has no swap test), or the ranks' collectives mismatch
        metrics = keys_on_every_rank(self.trainer, metrics)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._val = {}

    def stage_metadata(self) -> dict[str, Any]:
        ident = self.encoder.identity
        return {"clip": plain({"model_name": ident["model_name"], "pretrained": ident["pretrained"],
                               "architecture": ident["architecture"], "embed_dim": ident["embed_dim"]}),
                "net": None, "diffusion": None, "embed_stats": None, "system": {}}
