"""Metrics: FID/KID/IS protocol, offline Inception weights, CLIP score, FD on CLIP features, reports."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn
from torchmetrics.image.fid import _compute_fid

from unclip.eval.inception import INCEPTION_WEIGHTS_FILE, hub_weights_path
from unclip.eval.metrics import FrechetDistance, ImageMetrics, frechet_distance, to_eval_uint8
from unclip.eval.report import write_report

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


class TinyFeatures(nn.Module):
    """A fixed random conv + pooling: uint8 (B, 3, H, W) -> (B, 16). 1,216 parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 16, kernel_size=5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.2)
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1  # uint8 -> [-1, 1]
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))  # (B, 16)


class StubEncoder:
    """Mean colour as the image embedding; colour words as text embeddings. Matches are cos = 1."""

    embed_dim = 3

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))  # (B, 3)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embed = torch.tensor([COLOURS[c.split()[-1]] for c in captions])  # (B, 3)
        return {"text_embed": embed, "text_tokens": torch.zeros(len(captions), 4, 8), "text_mask": None}


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Random smooth images in [-1, 1], (n, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def coloured(names: list[str], size: int = 16) -> torch.Tensor:
    return torch.tensor([COLOURS[c] for c in names])[:, :, None, None].expand(-1, -1, size, size).clone()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network disabled in tests")

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


def tiny_metrics(names=("fid", "kid", "is"), **kwargs) -> ImageMetrics:
    return ImageMetrics(names, feature_extractor=TinyFeatures(), eval_size=32, kid_subsets=20, **kwargs)


# ---------------------------------------------------------------------- protocol
def test_to_eval_uint8_crops_and_rounds() -> None:
    x = torch.linspace(-1, 1, 256).view(1, 1, 1, 256).expand(2, 3, 256, 256)
    assert torch.equal(to_eval_uint8(x, 256)[0, 0, 0], torch.arange(256, dtype=torch.uint8))  # exact at size
    wide = torch.zeros(2, 3, 40, 80)
    wide[..., :, 20:60] = 1.0  # white centre band, black sides
    out = to_eval_uint8(wide, 16)  # short side 40 -> 16, width 80 -> 32, centre crop 16
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    assert out.float().mean() > 250  # the crop kept the centre


# ---------------------------------------------------------------------- FID / KID / IS
def test_fid_kid_zero_for_identical_sets_and_higher_when_shifted() -> None:
    real = smooth_images(64, seed=1)
    same, shifted = tiny_metrics(("fid", "kid")), tiny_metrics(("fid", "kid"))
    for m, fake in (
        (same, real),
        (shifted, (real * 0.5 + 0.4 + 0.2 * smooth_images(64, seed=2)).clamp(-1, 1)),
    ):
        m.update_real(real[:32])
        m.update_real(real[32:])
        m.update_fake(fake)
    r_same, r_shift = same.compute(), shifted.compute()
    assert set(r_same) == {"fid", "kid_mean", "kid_std"}
    assert abs(r_same["fid"]) < 1e-6 and r_shift["fid"] > 0.05
    assert abs(r_same["kid_mean"]) < 0.05 * r_shift["kid_mean"]
    # subset_size (default 1000) shrank to the 64 samples instead of raising
    assert same.metadata()["settings"]["kid_subset_size_used"] == 64


def test_frechet_distance_matches_torchmetrics_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 24, generator=gen, dtype=torch.float64), torch.randn(30, 24, generator=gen).double()
    b = b @ torch.randn(24, 24, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    args = (a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert float(frechet_distance(*args)) == pytest.approx(float(_compute_fid(*args)), rel=1e-9)
    m = FrechetDistance(24)
    m.update(a, real=True)
    m.update(b, real=False)
    assert float(m.compute()) == pytest.approx(float(_compute_fid(*args)), rel=1e-9)


def test_kid_and_fid_with_few_samples() -> None:
    m = tiny_metrics(("fid", "kid"))
    m.update_real(smooth_images(1, seed=0))
    m.update_fake(smooth_images(5, seed=1))
    assert m.compute() == {}
    assert "got 1 real" in m.unavailable["fid"] and "kid" in m.unavailable
    m.update_real(smooth_images(3, seed=2))
    out = m.compute()
    assert set(out) == {"fid", "kid_mean", "kid_std"} and m.metric("kid").last_subset_size == 4


def test_inception_score_sees_generated_images_only() -> None:
    real_a, real_b = smooth_images(16, seed=1), smooth_images(16, seed=2)
    fake_a, fake_b = smooth_images(16, seed=3), smooth_images(16, seed=4) * 0.3

    def run(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        m = tiny_metrics(("is",))
        m.update_real(real)
        assert m.metric("is").update_count == 0  # reals never reach IS
        m.update_fake(fake)
        assert sum(f.shape[0] for f in m.metric("is").features) == fake.shape[0]
        return m.compute()

    base = run(real_a, fake_a)
    assert set(base) == {"is_mean", "is_std"} and base["is_mean"] >= 1.0
    assert run(real_b, fake_a) == base  # changing the reals changes nothing
    assert run(real_a, fake_b)["is_mean"] != base["is_mean"]  # changing the fakes does


def test_deterministic_and_reset_keeps_reals() -> None:
    real, fake = smooth_images(24, seed=5), smooth_images(24, seed=6)
    results = []
    for _ in range(2):
        m = tiny_metrics()
        m.update_real(real)
        m.update_fake(fake)
        results.append(m.compute())
    assert results[0] == results[1]
    torch.manual_seed(123)  # global RNG state must not matter, and compute must not consume it
    state = torch.random.get_rng_state()
    assert m.compute() == results[0] and torch.equal(torch.random.get_rng_state(), state)
    m.reset(real=False)
    assert m.num_real == 24 and m.num_fake == 0
    m.update_fake(fake)
    assert m.compute() == results[0]
    m.reset()
    assert m.compute() == {} and m.num_real == 0


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        ImageMetrics(["fid", "psnr"], feature_extractor=TinyFeatures())
    with pytest.raises(ValueError, match="need an encoder"):
        ImageMetrics(["clip_score"])
    m = ImageMetrics(["clip_score"], encoder=StubEncoder())
    with pytest.raises(ValueError, match="one caption per generated image"):
        m.update_fake(coloured(["red", "blue"]))
    with pytest.raises(ValueError, match="float images"):
        m.update_fake(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["red", "blue"])


# ---------------------------------------------------------------------- CLIP metrics
def test_clip_score_ranks_matching_caption_higher() -> None:
    images = coloured(["red", "green", "blue"])
    scores = {}
    for name, captions in {
        "match": ["a red", "a green", "a blue"],
        "mismatch": ["a blue", "a red", "a green"],
    }.items():
        m = ImageMetrics(["clip_score"], encoder=StubEncoder())
        m.update_fake(images[:2], captions[:2])  # accumulates across batches
        m.update_fake(images[2:], captions[2:])
        scores[name] = m.compute()["clip_score"]
    assert scores["match"] == pytest.approx(100.0) and scores["mismatch"] == 0.0  # cos < 0 clamps to 0


def test_fd_clip_on_encoder_features() -> None:
    names = ["red", "green", "blue"] * 4
    real = coloured(names) + 0.1 * smooth_images(12, seed=0, size=16)
    same = ImageMetrics(["fd_clip"], encoder=StubEncoder())
    other = ImageMetrics(["fd_clip"], encoder=StubEncoder())
    for m, fake in ((same, real), (other, coloured(["red"] * 12) + 0.1 * smooth_images(12, seed=1, size=16))):
        m.update_real(real)
        m.update_fake(fake)
    assert abs(same.compute()["fd_clip"]) < 1e-6 and other.compute()["fd_clip"] > 1.0


def test_nonfinite_generated_images_are_left_out_and_counted() -> None:
    """A diverged sample (NaN pixels) must not turn every image metric into NaN or crash the Frechet distance
    after a whole evaluation: it is left out, counted and reported."""
    names = ["red", "green", "blue"] * 4
    real = coloured(names) + 0.1 * smooth_images(12, seed=0, size=16)
    clean, broken = (ImageMetrics(["fd_clip", "clip_score"], encoder=StubEncoder()) for _ in range(2))
    fake = real.clone()
    bad = torch.cat([fake, torch.full_like(fake[:3], float("nan"))])
    captions = [f"a {n}" for n in names]
    for m, images, caps in ((clean, fake, captions), (broken, bad, captions + ["a red"] * 3)):
        m.update_real(real)
        m.update_fake(images, caps)
    assert broken.compute() == pytest.approx(clean.compute())
    assert broken.num_fake_nonfinite == 3 and broken.metadata()["num_fake_nonfinite"] == 3
    assert broken.num_fake == 12
    all_bad = ImageMetrics(["fd_clip"], encoder=StubEncoder())
    all_bad.update_real(real)
    all_bad.update_fake(torch.full_like(fake, float("nan")))
    assert "fd_clip" not in all_bad.compute() and "fd_clip" in all_bad.metadata()["unavailable"]


# ---------------------------------------------------------------------- offline Inception weights
def test_missing_inception_weights_are_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_network: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="unclip.eval.metrics"):
        m = ImageMetrics(encoder=StubEncoder(), eval_size=16)  # all five metrics
        ImageMetrics(["fid"])  # the same reason is logged once
        names = ["red", "green", "blue", "red"]
        m.update_real(coloured(names) + 0.1 * smooth_images(4, seed=0, size=16))
        m.update_fake(coloured(names) + 0.1 * smooth_images(4, seed=1, size=16), [f"a {c}" for c in names])
        out = m.compute()
    assert time.perf_counter() - start < 2.0
    assert not m.inception_available
    reason = m.inception_reason
    assert INCEPTION_WEIGHTS_FILE in reason and "inception_weights=PATH" in reason and "\n" not in reason
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in reason
    assert [r.getMessage() for r in caplog.records] == [reason]
    assert set(out) == {"clip_score", "fd_clip"}
    assert m.unavailable == {"fid": reason, "kid": reason, "is": reason}
    assert m.metadata()["unavailable"]["fid"] == reason

    configured = ImageMetrics(["fid"], inception_weights=tmp_path / "nowhere.pth")
    assert f"inception_weights={tmp_path / 'nowhere.pth'} does not exist" in configured.inception_reason
    opted_in = ImageMetrics(["fid"], allow_download=True)  # offline: fails fast, never reaches the download
    assert "failed (network disabled in tests)" in opted_in.inception_reason
    assert time.perf_counter() - start < 2.0


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight InceptionV3 state dict in the official file's format; the URL loader is stubbed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # calibrate BatchNorm on one batch: with default running stats, random features collapse to a constant
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running stats = this batch's stats
    with torch.no_grad():
        net.train()(to_eval_uint8(smooth_images(2, seed=9), 64))
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_from_path_or_hub_cache(
    random_inception_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    m = ImageMetrics(["is"], inception_weights=random_inception_weights, eval_size=64)
    assert m.inception_available and m.inception_weights_path == str(random_inception_weights)
    m.extractor.train()
    assert not m.extractor.training  # BatchNorm statistics stay frozen
    pool, logits = m.extractor(to_eval_uint8(smooth_images(2, seed=0), 64))  # one forward, both outputs
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)

    # the same file found through torch.hub's cache, with no path configured
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub_weights_path().parent.mkdir(parents=True)
    hub_weights_path().symlink_to(random_inception_weights)
    cached = ImageMetrics(["fid"], eval_size=64)
    assert cached.inception_available and cached.inception_weights_path == str(hub_weights_path())


@pytest.mark.slow  # two 299-px Inception forwards and 2048-d FIDs: ~10-20 s on 2 CPU cores
def test_standard_inception_path_end_to_end(random_inception_weights: Path, no_network: None) -> None:
    real = torch.nn.functional.interpolate(smooth_images(6, seed=1), size=(48, 64))  # non-square input
    m = ImageMetrics(["fid", "kid", "is"], inception_weights=random_inception_weights, eval_size=64)
    m.update_real(real)
    m.update_fake(real)
    same = m.compute()
    assert set(same) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}
    assert m.metric("fid").real_features_sum.shape == (2048,)  # pool3 features
    assert m.metric("is").features[0].shape == (6, 1008)  # logits_unbiased, of the fakes only
    m.reset(real=False)
    m.update_fake(smooth_images(6, seed=2, size=48) * 0.3 + 0.5)
    shifted = m.compute()
    assert all(math.isfinite(v) for v in [*same.values(), *shifted.values()])
    assert shifted["fid"] > 1.0 and abs(same["fid"]) < 1e-4 * shifted["fid"]  # (KID is pure noise at n=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    real, fake = smooth_images(32, seed=1), smooth_images(32, seed=2) * 0.5
    results = []
    for device in ("cpu", "cuda"):
        m = tiny_metrics(("fid", "kid", "is", "clip_score"), encoder=StubEncoder(), device=device)
        m.update_real(real.to(device))
        m.update_fake(fake.to(device), ["a red"] * 32)
        results.append(m.compute())
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


# ---------------------------------------------------------------------- reports
def test_write_report(tmp_path: Path) -> None:
    m = ImageMetrics(["fid", "is", "clip_score"], encoder=StubEncoder(), inception_weights=tmp_path / "missing.pth")
    names = ["red", "green"]
    m.update_fake(coloured(names), [f"a {c}" for c in names])
    metrics = m.compute()
    extra = {**m.metadata(), "checkpoint": "outputs/decoder/last.ckpt", "nan_value": float("nan")}
    json_path, md_path = write_report(metrics, tmp_path / "report", "decoder | step 1000", extra)

    assert sorted(p.name for p in json_path.parent.iterdir()) == [
        "eval.json",
        "eval.md",
    ]  # no temp files left
    record = json.loads(json_path.read_text())
    assert record["title"] == "decoder | step 1000" and record["metrics"] == metrics
    assert record["num_fake"] == 2 and record["checkpoint"] == "outputs/decoder/last.ckpt"
    assert record["settings"]["eval_size"] == 256 and record["nan_value"] is None
    assert "missing.pth" in record["unavailable"]["fid"]

    md = md_path.read_text()
    assert md.startswith("# decoder | step 1000\n") and "| metric | value |" in md
    assert f"| clip_score | {metrics['clip_score']:.6g} |" in md
    assert f"- `fid`, `is`: {m.unavailable['fid']}" in md and "- checkpoint: outputs/decoder/last.ckpt" in md
    with pytest.raises(ValueError, match="reserved"):
        write_report(metrics, tmp_path, "x", {"metrics": {}})
