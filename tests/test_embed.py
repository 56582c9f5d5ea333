"""Embedding precompute (CPU, offline, tiny CLIP): stored fields equal on-the-fly CLIP, originals kept byte for
byte, bad inputs skipped and counted, resume, statistics, the DataModule reading the output, and the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from unclip.clip.encoder import ClipEncoder
from unclip.data import embed
from unclip.data.datamodule import WebDataModule
from unclip.data.embed import STATS_FILE, precompute_embeddings, shard_name
from unclip.data.sample import to_unit_range
from unclip.data.shapes import write_shapes
from unclip.data.transforms import ImageTransform
from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.systems.base import StageSystem

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("image_embed.npy", "text_embed.npy")

# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/clip/tiny.yaml"))
    cfg.pop("_target_")
    return ClipEncoder(**cfg)


def jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random image (gradients + noise) as JPEG bytes."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    image = np.stack([np.sin(6 * x + rng.uniform(0, 6)), x - y, np.cos(4 * y) * rng.uniform(-1, 1)], -1) * 90 + 128
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def make_samples(prefix: str, n: int, seed: int) -> list[dict]:
    """n samples: a non-square jpg, a distinct caption, a json and an opaque extra member."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        samples.append({
            "__key__": key,
            "jpg": jpeg(rng, int(rng.integers(36, 60)), int(rng.integers(36, 60))),
            "txt": f"a picture  number {i} of {prefix}\n".encode(),
            "json": json.dumps({"key": key, "width": 0}).encode(),
            "extra.bin": rng.bytes(int(rng.integers(1, 700))),
        })
    return samples


def make_shards(root: Path, num_shards: int, per_shard: int) -> dict[str, dict[str, dict]]:
    """Shards root/00000.tar ...; returns {shard name: {key: sample}}."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for s in range(num_shards):
        samples = make_samples(f"{s:03d}", per_shard, seed=s)
        write_shard(root / f"{s:05d}.tar", samples)
        shards[f"{s:05d}.tar"] = {x["__key__"]: x for x in samples}
    return shards


def read_members(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar, in member order (keys of webdataset: up to the first dot)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def reference(encoder: ClipEncoder, samples: list[dict]) -> dict[str, torch.Tensor]:
    """On-the-fly CLIP fields of raw samples, decoded and captioned as the data layer does it."""
    transform = ImageTransform(image_size=encoder.image_size)
    images = np.stack([transform(s["jpg"], None)["image"] for s in samples])  # (B, S, S, 3) uint8
    captions = [" ".join(s["txt"].decode().split()) for s in samples]
    text = encoder.encode_text(captions)
    image_embed = encoder.encode_image(to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2)))
    return {"image_embed": image_embed, **text}


def assert_fp16_close(stored: np.ndarray, expected: torch.Tensor) -> None:
    """Equal up to fp16 rounding (relative 2^-11) plus float32 batch-size noise."""
    expected = expected.float().numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


@pytest.fixture(scope="module")
def embedded(encoder, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """3 shards x 13 samples embedded with 2 workers and chunks of 5: (input dir, output dir, inputs, stats)."""
    root = tmp_path_factory.mktemp("embed")
    shards = make_shards(root / "in", num_shards=3, per_shard=13)
    stats = precompute_embeddings(encoder, f"{root}/in/{{00000..00002}}.tar", root / "out", batch_size=5,
                                  num_workers=2, progress=False)
    return root / "in", root / "out", shards, stats


# --------------------------------------------------------------------------------------------- tests


def test_round_trip_equals_on_the_fly_and_keeps_members(encoder, embedded):
    _, out, shards, stats = embedded
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(shards)
    for name, inputs in shards.items():
        outputs = read_members(out / name)
        assert list(outputs) == list(inputs)  # every sample, in input order
        for key, members in outputs.items():
            original = {k: v for k, v in inputs[key].items() if k != "__key__"}
            assert {k: members[k] for k in original} == original  # byte for byte
            assert set(members) == set(original) | set(FIELDS)  # no tokens unless asked
        ref = reference(encoder, list(inputs.values()))
        for field in ("image_embed", "text_embed"):
            stored = np.stack([load_npy(m[f"{field}.npy"]) for m in outputs.values()])
            assert stored.dtype == np.float16 and stored.shape == (13, encoder.embed_dim)
            assert_fp16_close(stored, ref[field])  # row i is key i's: alignment by construction
    assert stats["count"] == 39 and stats["count_this_run"] == 39 and stats["skipped"] == {}


def test_clip_crop_is_shorter_side_resize_then_centre_crop(encoder):
    """The decoded CLIP input is the standard preprocessing: shorter side to S (antialiased), centre crop."""
    data = jpeg(np.random.default_rng(0), 90, 50)
    got = ImageTransform(image_size=encoder.image_size)(data, None)["image"].astype(float)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    size = encoder.image_size
    resized = image.resize((round(90 * size / 50), size), Image.Resampling.BICUBIC)
    left = (resized.width - size) // 2
    expected = np.asarray(resized.crop((left, 0, left + size, size))).astype(float)
    assert np.abs(got - expected).mean() < 4  # sub-pixel crop offsets only


def test_stats_match_direct_computation(encoder, embedded):
    _, out, _, stats = embedded
    assert json.loads((out / STATS_FILE).read_text()) == stats
    stored = [load_npy(m["image_embed.npy"]) for p in sorted(out.glob("*.tar")) for m in read_members(p).values()]
    e = np.stack(stored).astype(np.float64)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(stats["image_embed_mean"], unit.mean(0), atol=2e-3)
    np.testing.assert_allclose(stats["image_embed_std"], unit.std(0), atol=2e-3)
    assert stats["embed_dim"] == encoder.embed_dim == len(stats["image_embed_std"])
    identity = stats["clip"]
    assert identity["weights_sha256"] == encoder.identity["weights_sha256"] and identity["embed_dim"] == 32
    assert {"model_name", "pretrained"} <= set(identity)
    assert stats["text_tokens"] is False and stats["shards"].endswith("{00000..00002}.tar")
    assert stats["num_shards"] == 3 and stats["failed_shards"] == []
    # What the prior does with embed_norm=standardize: standardised unit embeddings have mean 0, std 1.
    norm = EmbedNormalizer(encoder.embed_dim, "standardize", stats["image_embed_mean"], stats["image_embed_std"])
    x0 = norm.encode(torch.from_numpy(e).float())
    assert x0.mean(0).abs().max() < 0.05 and (x0.std(0, unbiased=False) - 1).abs().max() < 0.05


def test_text_tokens_and_datamodule_reads_them(encoder, tmp_path):
    shards = make_shards(tmp_path / "in", num_shards=2, per_shard=6)
    out = tmp_path / "out"
    stats = precompute_embeddings(encoder, [str(tmp_path / "in" / n) for n in shards], out, text_tokens=True,
                                  batch_size=4, progress=False)
    assert stats["text_tokens"] is True and stats["count"] == 12
    inputs = shards["00000.tar"]
    outputs = read_members(out / "00000.tar")
    ref = reference(encoder, list(inputs.values()))
    tokens = np.stack([load_npy(m["text_tokens.npy"]) for m in outputs.values()])
    mask = np.stack([load_npy(m["text_mask.npy"]) for m in outputs.values()])
    assert tokens.dtype == np.float16 and tokens.shape == (6, encoder.context_length, encoder.token_dim)
    assert mask.dtype == bool and mask.shape == (6, encoder.context_length)
    np.testing.assert_array_equal(mask, ref["text_mask"].numpy())
    assert_fp16_close(tokens, ref["text_tokens"])

    fields = ["image_embed", "text_embed", "text_tokens", "text_mask"]
    dm = WebDataModule(train_shards=f"{out}/*.tar", image_size=16, batch_size=4, num_workers=0, resampled=False,
                       shuffle_buffer=0, precomputed=fields, pin_memory=False)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["key"]) for b in batches) == 12
    batch = batches[0]
    assert batch["image_embed"].shape == batch["text_embed"].shape == (4, encoder.embed_dim)
    assert batch["image_embed"].dtype == torch.float16 and batch["text_tokens"].dtype == torch.float16
    assert batch["text_tokens"].shape == (4, encoder.context_length, encoder.token_dim)
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"].shape == (4, encoder.context_length)
    assert batch["image"].shape == (4, 3, 16, 16)

    class NoClip:  # a stage whose batch carries the fields never calls CLIP
        def __getattr__(self, name):
            raise AssertionError(f"CLIP was called ({name})")

    features = StageSystem.clip_features(type("Stage", (), {"clip": NoClip()})(), batch, tuple(fields))
    assert features["image_embed"].dtype == torch.float32 and features["text_mask"].dtype == torch.bool


def test_bad_inputs_are_skipped_counted_and_left_out(encoder, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    samples = make_samples("000", 8, seed=0)
    samples[1]["jpg"] = b"\xff\xd8 not a jpeg"
    del samples[3]["txt"]
    samples[5]["txt"] = b" \t\n "
    write_shard(root / "00000.tar", samples)
    write_shard(root / "00001.tar", make_samples("001", 8, seed=1))
    with tarfile.open(root / "00001.tar") as tar:
        cut = next(m.offset_data + m.size // 2 for m in tar if m.name == "0010004.jpg")
    (root / "00001.tar").write_bytes((root / "00001.tar").read_bytes()[:cut])  # truncated inside sample 4
    (root / "00002.tar").write_bytes(b"")  # a failed download: nothing can be read
    stats = precompute_embeddings(encoder, f"{root}/*.tar", tmp_path / "out", batch_size=4, progress=False)

    assert list(read_members(tmp_path / "out/00000.tar")) == [samples[i]["__key__"] for i in (0, 2, 4, 6, 7)]
    # The samples before the damage; the partial sample 4 (only its extra.bin member) is dropped.
    assert list(read_members(tmp_path / "out/00001.tar")) == [f"001{i:04d}" for i in range(4)]
    assert not (tmp_path / "out/00002.tar").exists()  # not marked done: the next run tries it again
    assert stats["count"] == 5 + 4
    assert stats["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1, "truncated_sample": 1,
                                "truncated_tar": 1, "unreadable_shard": 1}
    assert stats["failed_shards"] == [str(root / "00002.tar")]
    rerun = precompute_embeddings(encoder, f"{root}/*.tar", tmp_path / "out", progress=False)
    assert rerun["count_this_run"] == 0 and rerun["count"] == stats["count"]
    assert rerun["skipped"] == stats["skipped"] and rerun["failed_shards"] == stats["failed_shards"]


def test_interrupted_run_resumes_and_stats_cover_all_shards(encoder, embedded, tmp_path, monkeypatch):
    in_dir, _, _, full = embedded
    out = tmp_path / "out"
    finish = embed.ShardOutput.finish
    calls = []

    def interrupt_second_shard(self, *args):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self, *args)

    monkeypatch.setattr(embed.ShardOutput, "finish", interrupt_second_shard)
    with pytest.raises(KeyboardInterrupt):
        precompute_embeddings(encoder, f"{in_dir}/*.tar", out, batch_size=5, progress=False)
    monkeypatch.undo()
    assert [p.name for p in out.iterdir() if p.suffix == ".tar"] == ["00000.tar"]  # nothing half-written
    assert not list(out.glob(".*.tmp")) and not (out / STATS_FILE).exists()
    first = (out / "00000.tar").stat()

    stats = precompute_embeddings(encoder, f"{in_dir}/*.tar", out, batch_size=5, progress=False)
    assert (out / "00000.tar").stat().st_mtime_ns == first.st_mtime_ns  # finished shards are not redone
    assert stats["count_this_run"] == 26 and stats["count"] == full["count"] == 39
    np.testing.assert_allclose(stats["image_embed_mean"], full["image_embed_mean"], atol=1e-6)
    np.testing.assert_allclose(stats["image_embed_std"], full["image_embed_std"], atol=1e-6)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]

    with pytest.raises(ValueError, match="other settings.*text_tokens"):
        precompute_embeddings(encoder, f"{in_dir}/*.tar", out, text_tokens=True, progress=False)


def test_shard_patterns_and_names(encoder, tmp_path):
    with pytest.raises(ValueError, match="matches no shard"):
        precompute_embeddings(encoder, f"{tmp_path}/nothing-*.tar", tmp_path / "out", progress=False)
    make_shards(tmp_path / "a", 1, 1)
    make_shards(tmp_path / "b", 1, 1)
    with pytest.raises(ValueError, match="same output shard"):
        precompute_embeddings(encoder, [f"{tmp_path}/a/*.tar", f"{tmp_path}/b/*.tar"], tmp_path / "out")
    (tmp_path / "c").mkdir()
    (tmp_path / "c/00000.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no sample.*unreadable_shard"):
        precompute_embeddings(encoder, f"{tmp_path}/c/*.tar", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / STATS_FILE).exists()
    assert shard_name("/d/00001.tar") == shard_name("file:/d/00001.tar") == "00001.tar"
    assert shard_name("https://host/x/00001.tar?sig=1") == "00001.tar"
    assert shard_name("pipe:aws s3 cp s3://bucket/laion/00001.tar -") == "00001.tar"
    assert shard_name("pipe:curl -s 'https://host/00001.tar?sig=1'") == "00001.tar"
    assert embed.sidecar_name("00001.tar") == "00001_embed.json"


def test_cli(encoder, tmp_path):
    write_shapes(tmp_path / "shapes", num_train=24, num_val=0, num_heldout=0, shard_size=12, image_size=32,
                 progress=False)
    out = tmp_path / "out"
    env = {**os.environ, "UNCLIP_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    args = ["data=shapes_tiny", "clip=tiny", f"out_dir={out}", f"shards={tmp_path}/shapes/train/*.tar",
            "num_workers=0", "progress=false", f"hydra.run.dir={tmp_path}/run"]
    result = subprocess.run([sys.executable, "-m", "unclip.data.embed", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded 24 samples in 2 shards" in result.stdout
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["count"] == 24 and stats["clip"]["weights_sha256"] == encoder.identity["weights_sha256"]
    members = read_members(out / "00001.tar")
    assert len(members) == 12 and all({"jpg", "txt", "json", *FIELDS} == set(m) for m in members.values())
    assert not (tmp_path / "data").exists()  # explicit shards: the shapes generator did not run


def test_config_default_shards_run_the_data_prepare_step(encoder, tmp_path, monkeypatch):
    """Without shards=, the data config's training shards are embedded, generated first by its `prepare`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("UNCLIP_DATA_DIR", str(tmp_path / "data"))
    overrides = ["data=shapes_tiny", "clip=tiny", f"out_dir={tmp_path}/out", "num_workers=0", "progress=false",
                 "data.prepare.num_train=20", "data.prepare.num_val=0", "data.prepare.num_heldout=0",
                 "data.prepare.shard_size=10", "+data.prepare.progress=false"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=embed.CONF_DIR, version_base="1.3"):
        cfg = compose("embed", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the run's ${hydra:...} values, as @hydra.main would set them
    try:
        stats = embed.run_from_config(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert stats["count"] == 20 and stats["shards"] == f"{tmp_path}/data/shapes_tiny/train/*.tar"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_non_finite_embeddings_are_dropped(tmp_path):
    output = embed.ShardOutput(tmp_path / "00000.tar", embed_dim=4)
    entries = [embed.tar_entry("a.txt", b"a"), embed.tar_entry("b.txt", b"b")]
    image_embed = torch.tensor([[1.0, 0, 0, 0], [float("nan"), 0, 0, 0]])
    output.write(["a", "b"], entries, {"image_embed": image_embed, "text_embed": torch.ones(2, 4)})
    sidecar = output.finish({}, settings={})
    assert sidecar["count"] == 1 and sidecar["skipped"] == {"nonfinite_embed": 1}
    assert list(read_members(tmp_path / "00000.tar")) == ["a"] and sidecar["image_embed_sum"] == [1.0, 0, 0, 0]
