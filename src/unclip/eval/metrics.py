"""Image-generation metrics: FID, KID, IS on InceptionV3, FD on CLIP features, CLIP score.

| name         | paper                  | features                                   | images used     |
|--------------|------------------------|--------------------------------------------|-----------------|
| `fid`        | Heusel et al. 2017     | Inception pool3 (2048)                     | real vs fake    |
| `kid`        | Binkowski et al. 2018  | Inception pool3 (2048), cubic poly kernel  | real vs fake    |
| `is`         | Salimans et al. 2016   | Inception logits_unbiased (1008)           | fake only       |
| `fd_clip`    | Frechet distance       | CLIP image embeddings (D)                  | real vs fake    |
| `clip_score` | Hessel et al. 2021     | 100 * max(cos(image_embed, text_embed), 0) | fake + captions |

Protocol: images arrive as float (B, 3, H, W) in [-1, 1] at any size; for the Inception metrics the
shorter side is resized to `eval_size` (antialiased bicubic), center-cropped to `eval_size` x `eval_size`
and rounded to uint8, which is what the feature network takes (it resizes to 299 itself, with
torch-fidelity's TF1-compatible bilinear). One feature forward per batch serves FID, KID and IS: the
torchmetrics metrics are built with an identity feature module and receive precomputed features. The CLIP
encoder gets the [-1, 1] images as they are (it resizes and normalises itself), once per batch for both
`fd_clip` and `clip_score`.

When the Inception weights are not on this machine (see `unclip.eval.inception`), FID/KID/IS are reported as
unavailable with one line saying how to provide them; the CLIP metrics still run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from unclip.eval.inception import InceptionV3Features, resolve_inception_weights

log = logging.getLogger(__name__)

METRIC_NAMES = ("fid", "kid", "is", "clip_score", "fd_clip")
INCEPTION_METRICS = ("fid", "kid", "is")
ENCODER_METRICS = ("clip_score", "fd_clip")
_LOGGED_REASONS: set[str] = set()


class InsufficientSamplesError(ValueError):
    """Raised by a metric's compute() when it has too few samples to give a number."""


def to_eval_uint8(images: Tensor, eval_size: int) -> Tensor:
    """Float (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, eval_size, eval_size).

    Short side resized to eval_size, center crop, rounded to 0..255.
    """
    x = images.float().clamp(-1, 1)
    h, w = x.shape[-2:]
    if (h, w) != (eval_size, eval_size):
        scale = eval_size / min(h, w)
        size = (max(eval_size, round(h * scale)), max(eval_size, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - eval_size) // 2, (size[1] - eval_size) // 2
        x = x[..., top : top + eval_size, left : left + eval_size]  # (B, 3, eval_size, eval_size)
    # round, not truncate: (x * 255).byte() would bias every pixel down by half a level
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _num_rows(state: Tensor | list[Tensor]) -> int:
    """Rows in a list state (a list of (b, F) tensors, or one tensor after a distributed sync)."""
    if isinstance(state, Tensor):
        return state.shape[0]
    return sum(t.shape[0] for t in state)


class _Precomputed(nn.Module):
    """Identity 'feature network': the metric receives features that were computed once upstream."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017).

    S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so Tr((S1 S2)^(1/2)) is the sum of the
    square roots of its eigenvalues: two symmetric eigendecompositions instead of torchmetrics' general
    `eigvals(S1 @ S2)`, the same value (float64) about 10x faster at 2048-d on a CPU. Round-off leaves tiny
    negative eigenvalues on these rank-deficient covariances; they are clamped to 0.
    """
    w1, v1 = torch.linalg.eigh(sigma1)
    root1 = (v1 * w1.clamp(min=0).sqrt()) @ v1.T  # S1^(1/2), (F, F)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt


class FrechetDistance(FrechetInceptionDistance):
    """Frechet distance between Gaussians fitted to precomputed (B, F) features (FID: Heusel et al. 2017).

    torchmetrics' states (feature sums and outer-product sums, float64, summed across processes);
    `update(features, real)`. compute raises InsufficientSamplesError with fewer than 2 samples per side.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(feature=_Precomputed(num_features))

    def compute(self) -> Tensor:
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise InsufficientSamplesError(f"needs >= 2 real and >= 2 fake samples, got {n_real} real, {n_fake} fake")
        mu_real, sigma_real = self._gaussian(self.real_features_sum, self.real_features_cov_sum, n_real)
        mu_fake, sigma_fake = self._gaussian(self.fake_features_sum, self.fake_features_cov_sum, n_fake)
        return frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)

    @staticmethod
    def _gaussian(feature_sum: Tensor, outer_sum: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Mean (F,) and unbiased covariance (F, F) from sum_i x_i and sum_i x_i x_i^T."""
        mu = feature_sum / n
        return mu, (outer_sum - n * torch.outer(mu, mu)) / (n - 1)


class KernelDistance(KernelInceptionDistance):
    """Squared MMD with the cubic polynomial kernel on precomputed features (KID: Binkowski et al. 2018).

    `subset_size` shrinks to the number of samples when fewer were seen (torchmetrics would raise); the value
    is then noisier, and `last_subset_size` records what was used.
    """

    def __init__(self, subsets: int = 100, subset_size: int = 1000) -> None:
        with warnings.catch_warnings():  # "will save all extracted features in buffer": known, and intended
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=_Precomputed(0), subsets=subsets, subset_size=subset_size)
        self.max_subset_size = subset_size
        self.last_subset_size: int | None = None

    def compute(self) -> tuple[Tensor, Tensor]:
        n = min(_num_rows(self.real_features), _num_rows(self.fake_features))
        if n < 2:  # the unbiased MMD estimate divides by m (m - 1)
            raise InsufficientSamplesError(f"needs >= 2 real and >= 2 fake samples, got {n} on the smaller side")
        self.subset_size = self.last_subset_size = min(self.max_subset_size, n)
        return super().compute()


class LogitInceptionScore(InceptionScore):
    """exp(E_x KL(p(y|x) || p(y))) over splits, on precomputed logits (IS: Salimans et al. 2016).

    Only generated images belong here. Splits shrink to the number of samples when fewer were seen.
    """

    def __init__(self, splits: int = 10) -> None:
        with warnings.catch_warnings():  # "will save all extracted features in buffer": known, and intended
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=_Precomputed(0), splits=splits)
        self.max_splits = splits

    def compute(self) -> tuple[Tensor, Tensor]:
        n = _num_rows(self.features)
        if n < 2:  # the std over splits needs two of them
            raise InsufficientSamplesError(f"needs >= 2 generated samples, got {n}")
        self.splits = min(self.max_splits, n)
        return super().compute()


class ClipScore(Metric):
    """Mean of 100 * max(cos(image_embed, text_embed), 0) over image-caption pairs (CLIP score: Hessel et al.
    2021, with the common scale 100 instead of the paper's 2.5). Takes embeddings, so any encoder works.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    score_sum: Tensor
    num_pairs: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_embed: Tensor, text_embed: Tensor) -> None:
        """image_embed (B, D), text_embed (B, D): row i of each is one pair."""
        if image_embed.shape != text_embed.shape or image_embed.dim() != 2:
            raise ValueError(
                f"expected two (B, D) embeddings, got {tuple(image_embed.shape)}, {tuple(text_embed.shape)}"
            )
        cos = F.cosine_similarity(image_embed.double(), text_embed.double(), dim=-1)  # (B,)
        self.score_sum += (100 * cos.clamp(min=0)).sum()
        self.num_pairs += cos.numel()

    def compute(self) -> Tensor:
        if int(self.num_pairs) == 0:
            raise InsufficientSamplesError("needs >= 1 generated image with its caption, got 0")
        return (self.score_sum / self.num_pairs).float()


class ImageMetrics:
    """The evaluation bundle: `update_real(images)`, `update_fake(images, captions)`, `compute()`, `reset()`.

    Not an `nn.Module` on purpose: a system can hold one without putting ~95 MB of Inception weights (or a
    second reference to its CLIP) into its checkpoints. Move it with `.to(device)`; the encoder stays where
    its owner put it.

    Args:
        metrics: which of `fid`, `kid`, `is`, `clip_score`, `fd_clip` to compute.
        encoder: object with `encode_image(images in [-1, 1]) -> (B, D)` and `encode_text(list[str])`
            returning a dict with `text_embed` (B, D); needed by `clip_score` and `fd_clip`.
        eval_size: images are short-side resized and center-cropped to this before the Inception network.
        inception_weights: local path of weights-inception-2015-12-05-6726825d.pth (default: look in
            torch.hub's cache, `$TORCH_HOME/hub/checkpoints/`).
        allow_download: fetch the weights when missing (off by default: offline machines can hang on it).
        feature_extractor: replaces Inception for fid/kid/is: uint8 (B, 3, eval_size, eval_size) -> (B, F),
            or a (pool (B, F), logits (B, C)) tuple; with a single output, IS reads it as logits.
        kid_subsets, kid_subset_size: KID subsets and their size (shrunk to the sample count when larger).
        is_splits: IS splits.
        seed: seeds the subset draws of KID and IS, so equal inputs give equal numbers.
        device: where features and metric states live.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("fid", "kid", "is", "clip_score", "fd_clip"),
        encoder: Any | None = None,
        eval_size: int = 256,
        inception_weights: str | os.PathLike | None = None,
        allow_download: bool = False,
        feature_extractor: nn.Module | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.names = tuple(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
        unknown = [m for m in self.names if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(METRIC_NAMES)}")
        needs_encoder = [m for m in self.names if m in ENCODER_METRICS]
        if needs_encoder and encoder is None:
            raise ValueError(
                f"{needs_encoder} need an encoder with encode_image/encode_text (the CLIP); pass "
                "encoder=... or drop them from metrics"
            )
        if eval_size < 8:
            raise ValueError(f"eval_size={eval_size} is too small; 256 is the usual protocol")
        self.encoder = encoder
        self.eval_size = eval_size
        self.seed = seed
        self.device = torch.device(device)
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        self.num_real = 0
        self.num_fake = 0
        self.num_fake_nonfinite = 0  # generated images with NaN / inf pixels: left out of every metric, counted
        self.unavailable: dict[str, str] = {}
        self._static_unavailable: dict[str, str] = {}
        self._metrics: dict[str, Metric] = {}

        # the feature network for fid/kid/is: injected, or Inception from a local file, or none (unavailable)
        self.extractor: nn.Module | None = None
        self.inception_weights_path: str | None = None
        self.inception_reason: str | None = None
        inception_names = [m for m in self.names if m in INCEPTION_METRICS]
        if inception_names:
            if feature_extractor is not None:
                self.extractor = feature_extractor
            else:
                path, reason = resolve_inception_weights(inception_weights, allow_download)
                if path is None:
                    self.inception_reason = reason
                else:
                    self.extractor = InceptionV3Features(path)
                    self.inception_weights_path = str(path)
        if self.inception_reason is not None:
            if self.inception_reason not in _LOGGED_REASONS:
                _LOGGED_REASONS.add(self.inception_reason)
                log.warning(self.inception_reason)
            self._static_unavailable = {m: self.inception_reason for m in inception_names}
        elif self.extractor is not None:
            self.extractor.eval()
            pool_dim = self._probe_extractor_dim()
            if "fid" in self.names:
                self._metrics["fid"] = FrechetDistance(pool_dim)
            if "kid" in self.names:
                self._metrics["kid"] = KernelDistance(kid_subsets, kid_subset_size)
            if "is" in self.names:
                self._metrics["is"] = LogitInceptionScore(is_splits)
        if "clip_score" in self.names:
            self._metrics["clip_score"] = ClipScore()
        if "fd_clip" in self.names:
            embed_dim = getattr(encoder, "embed_dim", None)
            if embed_dim is None:
                with torch.no_grad():
                    embed_dim = encoder.encode_image(torch.zeros(1, 3, eval_size, eval_size)).shape[-1]
            self._metrics["fd_clip"] = FrechetDistance(int(embed_dim))
        self.unavailable = dict(self._static_unavailable)
        self.to(self.device)

    @property
    def inception_available(self) -> bool:
        """False when fid/kid/is were asked for but no feature network was found; see `inception_reason`."""
        return self.inception_reason is None

    def metric(self, name: str) -> Metric:
        """The torchmetrics object behind `name` (e.g. to inspect its states)."""
        return self._metrics[name]

    def to(self, device: str | torch.device) -> ImageMetrics:
        self.device = torch.device(device)
        if self.extractor is not None:
            self.extractor.to(self.device)
        for metric in self._metrics.values():
            metric.to(self.device)
        return self

    def _probe_extractor_dim(self) -> int:
        """Width of the pool features: the network's `num_features` if declared, else one probe forward."""
        if isinstance(getattr(self.extractor, "num_features", None), int):
            return self.extractor.num_features
        param = next(self.extractor.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        size = self.eval_size
        pool, _ = self._features(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
        return pool.shape[-1]

    # ------------------------------------------------------------------ features
    def _features(self, images_uint8: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (B, 3, S, S) -> (pool (B, F), logits (B, C)), one forward of the feature network."""
        # the standard features are float32: inside a bf16 autocast region (a Lightning validation step) the
        # Inception numbers would silently change
        with torch.no_grad(), torch.autocast(images_uint8.device.type, enabled=False):
            out = self.extractor(images_uint8)
        pool, logits = out if isinstance(out, (tuple, list)) else (out, out)
        b = images_uint8.shape[0]
        if pool.dim() != 2 or pool.shape[0] != b or logits.dim() != 2 or logits.shape[0] != b:
            raise ValueError(
                f"the feature network must return (B, F) features for B={b} images, got "
                f"{tuple(pool.shape)} and {tuple(logits.shape)}"
            )
        return pool.float(), logits.float()

    def _image_embed(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder.encode_image(images).float().to(self.device)  # (B, D)

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images (B, 3, H, W) in [-1, 1], got {images.dtype} {tuple(images.shape)}")

    # ------------------------------------------------------------------ updates
    def update_real(self, images: Tensor) -> None:
        """Real images, float (B, 3, H, W) in [-1, 1]: feed fid/kid/fd_clip's real side (never IS)."""
        self._check_images(images)
        if self.extractor is not None and ("fid" in self._metrics or "kid" in self._metrics):
            pool, _ = self._features(to_eval_uint8(images.to(self.device), self.eval_size))
            for name in ("fid", "kid"):
                if name in self._metrics:
                    self._metrics[name].update(pool, real=True)
        if "fd_clip" in self._metrics:
            self._metrics["fd_clip"].update(self._image_embed(images), real=True)
        self.num_real += images.shape[0]

    def update_fake(self, images: Tensor, captions: Sequence[str] | None = None) -> None:
        """Generated images, float (B, 3, H, W) in [-1, 1], with their captions (needed by clip_score). Images
        with non-finite pixels (a diverged sampler) are left out and counted (`num_fake_nonfinite`)."""
        self._check_images(images)
        if "clip_score" in self._metrics and (captions is None or len(captions) != images.shape[0]):
            got = "none" if captions is None else len(captions)
            raise ValueError(
                f"clip_score needs one caption per generated image: {images.shape[0]} images, {got} captions"
            )
        finite = torch.isfinite(images).flatten(1).all(1)  # (B,); evaluation only, a host sync is fine here
        if not bool(finite.all()):
            bad = int((~finite).sum())
            self.num_fake_nonfinite += bad
            log.warning("%d generated images have NaN/inf pixels: left out of the image metrics (%d so far)", bad,
                        self.num_fake_nonfinite)
            keep = finite.nonzero().flatten().tolist()
            images = images[finite]
            captions = [captions[i] for i in keep] if captions is not None else None
            if not keep:
                return
        if self.extractor is not None and any(m in self._metrics for m in INCEPTION_METRICS):
            pool, logits = self._features(to_eval_uint8(images.to(self.device), self.eval_size))
            for name in ("fid", "kid"):
                if name in self._metrics:
                    self._metrics[name].update(pool, real=False)
            if "is" in self._metrics:
                self._metrics["is"].update(logits)
        if "fd_clip" in self._metrics or "clip_score" in self._metrics:
            image_embed = self._image_embed(images)
            if "fd_clip" in self._metrics:
                self._metrics["fd_clip"].update(image_embed, real=False)
            if "clip_score" in self._metrics:
                with torch.no_grad():
                    text_embed = self.encoder.encode_text(list(captions))["text_embed"]
                self._metrics["clip_score"].update(image_embed, text_embed.float().to(self.device))
        self.num_fake += images.shape[0]

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, float]:
        """Keys among fid, kid_mean, kid_std, is_mean, is_std, clip_score, fd_clip; others: `unavailable`."""
        results: dict[str, float] = {}
        self.unavailable = dict(self._static_unavailable)
        for name, metric in self._metrics.items():
            try:
                # KID's subsets and IS's split order come from torch.randperm on the CPU generator: seed a fork
                with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                    torch.random.default_generator.manual_seed(self.seed)
                    # after reset(real=False) states exist before any update; our own checks report emptiness
                    warnings.filterwarnings("ignore", message=r".*called before the ``update``", category=UserWarning)
                    value = metric.compute()
            except (InsufficientSamplesError, torch.linalg.LinAlgError) as err:
                self.unavailable[name] = f"{name} unavailable: {err}"
                continue
            if isinstance(value, tuple):  # kid, is: (mean, std)
                results[f"{name}_mean"], results[f"{name}_std"] = float(value[0]), float(value[1])
            else:
                results[name] = float(value)
        order = ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "clip_score", "fd_clip")
        return {k: results[k] for k in order if k in results}

    def reset(self, real: bool = True) -> None:
        """Clear all states; `real=False` keeps the real-image statistics (they rarely change)."""
        for metric in self._metrics.values():
            if hasattr(metric, "reset_real_features"):
                metric.reset_real_features = real
            metric.reset()
        if real:
            self.num_real = 0
        self.num_fake = 0
        self.num_fake_nonfinite = 0
        self.unavailable = dict(self._static_unavailable)

    def metadata(self) -> dict[str, Any]:
        """Sample counts, settings and unavailable reasons, for the report."""
        if self.inception_weights_path is not None:
            network = f"inception-v3 (torch-fidelity, {self.inception_weights_path})"
        elif self.extractor is not None:
            network = f"custom: {type(self.extractor).__name__}"
        else:
            network = None
        kid = self._metrics.get("kid")
        return {
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "num_fake_nonfinite": self.num_fake_nonfinite,
            "settings": {
                "metrics": list(self.names),
                "eval_size": self.eval_size,
                "resize": "short side bicubic (antialias) + center crop, rounded to uint8",
                "feature_network": network,
                "kid_subsets": self.kid_subsets,
                "kid_subset_size": self.kid_subset_size,
                "kid_subset_size_used": getattr(kid, "last_subset_size", None),
                "is_splits": self.is_splits,
                "seed": self.seed,
            },
            "unavailable": dict(self.unavailable),
        }
