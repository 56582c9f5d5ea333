"""The standard FID/IS/KID feature network: InceptionV3 with the 2015-12-05 TensorFlow weights.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the one torchmetrics' ``NoTrainInceptionV3``
subclasses). Its constructor downloads the weights when given no path, so we never call it without one: the
weights file is looked up locally and a download only happens when the caller opts in. A download attempt on a
machine with no network can hang for minutes, hence the opt-in.

Lookup order for ``weights-inception-2015-12-05-6726825d.pth``:
1. the explicitly configured path (``inception_weights=PATH``), if any (nothing else is tried then);
2. torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``; ``$TORCH_HOME`` defaults to
   ``$XDG_CACHE_HOME/torch``, i.e. ``~/.cache/torch``), where torch-fidelity's own download lands;
3. a download into that cache, only with ``allow_download=True``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool3 features (FID, KID), logits without bias (IS)


def hub_weights_path() -> Path:
    """Where torch.hub (and torch-fidelity) cache the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def missing_weights_reason(looked_at: Path, configured: bool) -> str:
    """One line telling the user exactly how to provide the weights."""
    where = f"configured inception_weights={looked_at} does not exist" if configured else f"{looked_at} not found"
    return (
        f"FID/KID/IS unavailable: Inception weights {INCEPTION_WEIGHTS_FILE} missing ({where}); "
        f"download {INCEPTION_WEIGHTS_URL} into {hub_weights_path().parent}/ (or set TORCH_HOME), "
        "pass inception_weights=PATH, or allow_download=true on a machine with network"
    )


def resolve_inception_weights(
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    connect_timeout_s: float = 5.0,
) -> tuple[Path | None, str | None]:
    """Find the weights file without touching the network unless ``allow_download``.

    Returns ``(path, None)`` when a file is there, else ``(None, reason)`` with a one-line reason.
    """
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        return (path, None) if path.is_file() else (None, missing_weights_reason(path, configured=True))
    path = hub_weights_path()
    if path.is_file():
        return path, None
    if not allow_download:
        return None, missing_weights_reason(path, configured=False)
    try:
        # a quick connect first: urlopen has no timeout here and can hang for minutes on a closed network
        host = urlparse(INCEPTION_WEIGHTS_URL).hostname
        socket.create_connection((host, 443), timeout=connect_timeout_s).close()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path), progress=False)
    except Exception as err:  # network errors come in many types; all mean "not available"
        return None, (
            f"FID/KID/IS unavailable: downloading {INCEPTION_WEIGHTS_URL} to {path} failed ({err}); "
            f"put {INCEPTION_WEIGHTS_FILE} there by hand or pass inception_weights=PATH"
        )
    return path, None


class InceptionV3Features(nn.Module):
    """uint8 images (B, 3, H, W) in [0, 255] -> (pool3 (B, 2048), logits_unbiased (B, 1008)), in one forward.

    Inside, torch-fidelity resizes to 299 with its TF1-compatible bilinear (no antialias, as the original
    TF graph did) and scales to [-1, 1]. The net stays in eval mode: BatchNorm must use its stored statistics
    even when a parent module calls ``.train()``.
    """

    num_features = 2048  # pool3 width, read by ImageMetrics (and torchmetrics) instead of a probe forward

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        path = str(weights_path)
        # torch-fidelity loads with weights_only=False; load once with weights_only=True first so a file that
        # holds anything but tensors is refused before it is unpickled unsafely.
        torch.load(path, map_location="cpu", weights_only=True)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", list(INCEPTION_FEATURES), feature_extractor_weights_path=path
        )
        self.net.eval()

    def train(self, mode: bool = True) -> InceptionV3Features:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)  # (B, 2048), (B, 1008)
        return pool, logits
