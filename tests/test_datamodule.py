"""WebDataModule on shards written here (CPU, offline): the batch contract, splitting, resampling, and
skip-and-count of bad inputs."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from unclip.data.datamodule import DATA_STATS_KEY, WebDataModule
from unclip.data.errors import MAX_CONSECUTIVE_SHARD_ERRORS, SkipCounter, SkipSample
from unclip.data.text import clean_caption

# ------------------------------------------------------------------------------------------- helpers


def natural_image(rng: np.random.Generator, width: int = 48, height: int = 40) -> np.ndarray:
    """Smooth colour gradients + blobs + mild noise, uint8 (H, W, 3): structure for alignment checks."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))]
    channels += [x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1), np.cos(5 * x) * np.sin(3 * y)]
    image = np.stack(channels, -1) * 80 + 128 + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    """Samples are dicts of member -> bytes or str (plus __key__)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write({k: v if k == "__key__" or isinstance(v, bytes) else v.encode() for k, v in sample.items()})


def jpg_txt_shards(root: Path, num_shards: int, per_shard: int, seed: int = 0, **size) -> list[str]:
    """num_shards shards of jpg + txt; keys are unique across shards. Returns the keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:03d}{i:04d}"
            samples.append({"__key__": key, "jpg": encode(natural_image(rng, **size)), "txt": f"caption {key}"})
            keys.append(key)
        write_shard(root / f"{s:05d}.tar", samples)
    return keys


def pattern(root: Path, num_shards: int) -> str:
    return f"{root}/{{00000..{num_shards - 1:05d}}}.tar"


def make_dm(**kw) -> WebDataModule:
    defaults = dict(image_size=32, batch_size=4, num_workers=0, pin_memory=False, shuffle_buffer=8)
    dm = WebDataModule(**{**defaults, **kw})
    dm.setup("fit")
    return dm


def drain(loader, dm: WebDataModule | None = None) -> list[dict]:
    """All batches of one epoch, passed through the DataModule's pre-transfer hook when dm is given."""
    return [dm.on_before_batch_transfer(b, 0) if dm is not None else b for b in loader]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ------------------------------------------------------------------------------------ batch contract


def test_txt_captions_and_image_contract(tmp_path: Path) -> None:
    keys = jpg_txt_shards(tmp_path, 2, 6, width=60, height=40)
    dm = make_dm(val_shards=pattern(tmp_path, 2), val_batch_size=5, lowres_size=16, clip_image_size=48)
    batches = drain(dm.val_dataloader(), dm)
    assert [len(b["key"]) for b in batches] == [5, 5, 2]  # validation keeps the partial batch
    assert keys_of(batches) == keys  # finite, unshuffled validation keeps shard order
    batch = batches[0]
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["lowres_image"].shape == (5, 3, 16, 16)
    assert batch["clip_image"].shape == (5, 3, 48, 48)
    for name in ("image", "lowres_image", "clip_image"):
        assert -1.0 <= batch[name].min() < -0.2 and 0.2 < batch[name].max() <= 1.0
    assert batch["caption"] == [f"caption {k}" for k in batch["key"]]
    assert batch["meta"] == [{}] * 5
    assert DATA_STATS_KEY not in batch  # popped by on_before_batch_transfer
    assert set(batch) == {"image", "lowres_image", "clip_image", "caption", "key", "meta"}


def test_uint8_transfer_gives_the_model_the_same_batch(tmp_path: Path) -> None:
    jpg_txt_shards(tmp_path, 1, 6)
    kw = dict(val_shards=pattern(tmp_path, 1), val_batch_size=6, lowres_size=16)
    reference = drain(make_dm(**kw).val_dataloader())[0]
    dm = make_dm(**kw, uint8_transfer=True)
    shipped = drain(dm.val_dataloader(), dm)[0]
    assert shipped["image"].dtype == torch.uint8 and shipped["image"].shape == (6, 3, 32, 32)
    converted = dm.transfer_batch_to_device(shipped, torch.device("cpu"), 0)
    for name in ("image", "lowres_image"):
        assert converted[name].dtype == torch.float32 and converted[name].is_contiguous()
        assert torch.equal(converted[name], reference[name])


def alignment_error(small: torch.Tensor, large: torch.Tensor) -> float:
    """Mean absolute difference between `small` and `large` downsampled (antialiased) to its size."""
    down = F.interpolate(large, size=small.shape[-2:], mode="bicubic", antialias=True)
    return (down - small).abs().mean().item()


def test_lowres_and_clip_images_align_under_random_crop_and_flip(tmp_path: Path) -> None:
    jpg_txt_shards(tmp_path, 1, 8, width=96, height=48)  # wide images: random crops differ a lot
    dm = make_dm(
        train_shards=pattern(tmp_path, 1), resampled=False, random_crop=True, random_flip=True,
        lowres_size=16, clip_image_size=64, batch_size=8,
    )  # fmt: skip
    batch = drain(dm.train_dataloader(), dm)[0]
    image, lowres, clip = batch["image"], batch["lowres_image"], batch["clip_image"]
    aligned = alignment_error(lowres, image)
    misaligned = alignment_error(lowres.flip(-1), image)
    assert aligned < 0.03 and aligned < 0.25 * misaligned
    assert alignment_error(image, clip) < 0.03 < alignment_error(image.flip(-1), clip)


def test_json_caption_from_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = [
        {"__key__": f"k{i}", "png": encode(natural_image(rng), "PNG"), "json": json.dumps(meta)}
        for i, meta in enumerate(
            [{"caption": "  A  red\tcircle ", "id": 0}, {"caption": ["a dog", "a puppy"], "id": 1}]
        )
    ]
    write_shard(tmp_path / "00000.tar", samples)
    dm = make_dm(val_shards=str(tmp_path / "*.tar"), caption_key="json:caption", lowercase=True)
    batch = drain(dm.val_dataloader(), dm)[0]
    assert batch["caption"][0] == "a red circle"
    assert batch["caption"][1] in {"a dog", "a puppy"}  # a list of captions: one drawn per sample
    assert [m["id"] for m in batch["meta"]] == [0, 1]
    assert batch["image"].shape == (2, 3, 32, 32)


def test_class_label_captions_with_templates(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    names = ["cat", "dog", "tiger shark"]
    samples = [{"__key__": f"k{i:02d}", "jpg": encode(natural_image(rng)), "cls": str(i % 3)} for i in range(24)]
    write_shard(tmp_path / "00000.tar", samples)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    dm = make_dm(
        train_shards=str(tmp_path / "00000.tar"), resampled=False, caption_key="cls",
        class_names=names, caption_templates=templates, batch_size=8,
    )  # fmt: skip
    batches = drain(dm.train_dataloader(), dm)
    assert len(keys_of(batches)) == 24
    used = Counter()
    for b in batches:
        for key, caption in zip(b["key"], b["caption"]):
            name = names[int(key[1:]) % 3]
            matches = [t for t in templates if caption == t.format(name)]
            assert matches, caption
            used[matches[0]] += 1
    assert len(used) == 2  # templates are drawn per sample


def test_precomputed_fields_pass_through_without_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stored = {}
    samples = []
    for i in range(6):
        fields = {
            "image_embed": rng.normal(size=8).astype(np.float16),
            "text_embed": rng.normal(size=8).astype(np.float32),
            "text_tokens": rng.normal(size=(5, 4)).astype(np.float16),
            "text_mask": np.arange(5) < i,
        }
        stored[f"k{i}"] = fields
        members = {f"{name}.npy": npy(value) for name, value in fields.items()}
        samples.append({"__key__": f"k{i}", "txt": f"caption {i}", "jpg": b"never decoded", **members})
    write_shard(tmp_path / "00000.tar", samples)
    fields = ["image_embed", "text_embed", "text_tokens", "text_mask"]
    dm = make_dm(val_shards=str(tmp_path / "00000.tar"), load_image=False, precomputed=fields, val_batch_size=6)
    batch = drain(dm.val_dataloader(), dm)[0]
    assert "image" not in batch
    assert batch["image_embed"].dtype == torch.float16 and batch["image_embed"].shape == (6, 8)
    assert batch["text_embed"].dtype == torch.float32
    assert batch["text_tokens"].dtype == torch.float16 and batch["text_tokens"].shape == (6, 5, 4)
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"].shape == (6, 5)
    for row, key in enumerate(batch["key"]):
        for name in fields:
            assert np.array_equal(batch[name][row].numpy(), stored[key][name])
    assert dm.skipped_counts() == {}


def test_missing_precomputed_field_is_skipped_and_counted(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "txt": "x", "image_embed.npy": npy(np.zeros(4, np.float32))} for i in range(3)]
    samples.append({"__key__": "k3", "txt": "no embedding"})
    write_shard(tmp_path / "00000.tar", samples)
    dm = make_dm(val_shards=str(tmp_path / "00000.tar"), load_image=False, precomputed=["image_embed"])
    assert keys_of(drain(dm.val_dataloader(), dm)) == ["k0", "k1", "k2"]
    assert dm.skipped_counts() == {"missing_image_embed": 1}


def test_clean_caption() -> None:
    assert clean_caption("  A\tred\n\x00circle\u200b &amp; Co ") == "A red circle & Co"
    assert clean_caption("MiXeD", lowercase=True) == "mixed"
    assert clean_caption(" \x07\n ") == ""


# ----------------------------------------------------------------------------- epochs and splitting


def test_finite_mode_yields_each_sample_exactly_once_across_two_workers(tmp_path: Path) -> None:
    keys = jpg_txt_shards(tmp_path, 4, 5)
    dm = make_dm(
        train_shards=pattern(tmp_path, 4), val_shards=pattern(tmp_path, 4), resampled=False,
        num_workers=2, batch_size=5, val_batch_size=3,
    )  # fmt: skip
    loader = dm.train_dataloader()
    first, second = keys_of(drain(loader, dm)), keys_of(drain(loader, dm))
    assert sorted(first) == sorted(keys) == sorted(second)
    assert first != second  # shard order and buffer are reshuffled per epoch
    val = keys_of(drain(dm.val_dataloader(), dm))  # partial batches kept: 3 + 3 + 3 + 1 per worker
    assert sorted(val) == sorted(keys)
    assert dm.samples_seen("train") == 40 and dm.samples_seen("val") == 20


def test_finite_mode_reduces_workers_to_the_shard_count(tmp_path: Path, caplog) -> None:
    jpg_txt_shards(tmp_path, 2, 3)
    dm = make_dm(val_shards=pattern(tmp_path, 2), num_workers=4)
    with caplog.at_level(logging.WARNING):
        loader = dm.val_dataloader()
    assert loader.num_workers == 2 and "using 2 instead of num_workers=4" in caplog.text
    dm._world_size = 3  # more ranks than shards: no way to read each sample exactly once
    with pytest.raises(ValueError, match="2 shard.* cannot be split over 3 ranks"):
        dm.val_dataloader()


def test_resampled_mode_yields_the_configured_epoch_length(tmp_path: Path) -> None:
    jpg_txt_shards(tmp_path, 3, 4)
    dm = make_dm(train_shards=pattern(tmp_path, 3), resampled=True, epoch_length=48, batch_size=4, num_workers=2)
    loader = dm.train_dataloader()
    assert len(loader) == 12  # 48 samples / (1 rank x 2 workers x 4 per batch) = 6 batches per worker
    first, second = keys_of(drain(loader, dm)), keys_of(drain(loader, dm))
    assert len(first) == len(second) == 48 and first != second
    assert set(first) <= {f"{s:03d}{i:04d}" for s in range(3) for i in range(4)}
    assert dm.samples_seen() == 96


# ----------------------------------------------------------------------------------- bad inputs


def bad_shards(root: Path) -> tuple[str, list[str]]:
    """Shard 0: good samples mixed with bad ones; shard 1: a truncated tar; shard 2: good.
    Returns (pattern, keys of the good samples)."""
    rng = np.random.default_rng(4)
    good = lambda key: {"__key__": key, "jpg": encode(natural_image(rng)), "txt": f"caption {key}"}
    big = encode(np.zeros((120, 120, 3), np.uint8), "PNG")  # > max_image_pixels=10_000 below
    write_shard(
        root / "00000.tar",
        [
            good("a0"),
            {"__key__": "a1", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": "corrupt"},
            {"__key__": "a2", "jpg": encode(natural_image(rng))},  # no caption
            good("a3"),
            {"__key__": "a4", "mp4": b"\x00" * 64, "txt": "not an image"},
            {"__key__": "a5", "png": big, "txt": "too many pixels"},
            {"__key__": "a6", "jpg": encode(natural_image(rng))[:300], "txt": "truncated jpeg"},
            {"__key__": "a7", "jpg": encode(natural_image(rng)), "txt": " \x00\t "},  # empty after cleaning
            good("a8"),
        ],
    )
    full = root / "full.tar"
    write_shard(full, [good(f"b{i}") for i in range(6)])
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    cut = members[7].offset_data + members[7].size // 2  # inside sample b3's second member
    complete = sorted({m.name.split(".")[0] for m in members if m.offset_data + m.size <= cut} - {"b3"})
    (root / "00001.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    write_shard(root / "00002.tar", [good(f"c{i}") for i in range(4)])
    return pattern(root, 3), ["a0", "a3", "a8", *complete, *[f"c{i}" for i in range(4)]]


EXPECTED_SKIPS = {
    "corrupt_image": 2,  # a1 (not a jpeg), a6 (truncated jpeg)
    "missing_caption": 2,  # a2, and b3 whose .txt (written after .jpg) the truncation cut
    "missing_image": 1,  # a4 (mp4 only)
    "oversized_image": 1,  # a5
    "empty_caption": 1,  # a7
    "truncated_tar": 1,  # shard 1, counted once although webdataset reports it twice
}


def test_bad_inputs_are_skipped_counted_and_fast(tmp_path: Path) -> None:
    spec, good_keys = bad_shards(tmp_path)
    dm = make_dm(val_shards=spec, max_image_pixels=10_000)
    start = time.perf_counter()
    batches = drain(dm.val_dataloader(), dm)
    assert time.perf_counter() - start < 2.0  # no per-error sleep (warn_and_continue sleeps 0.5 s)
    assert keys_of(batches) == good_keys
    assert dm.skipped_counts() == EXPECTED_SKIPS
    assert dm.samples_seen("val") == len(good_keys)


def test_counts_add_up_across_workers(tmp_path: Path) -> None:
    spec, good_keys = bad_shards(tmp_path)
    dm = make_dm(val_shards=spec, max_image_pixels=10_000, num_workers=2, val_batch_size=2)
    loader = dm.val_dataloader()
    raw = list(loader)
    sources = {b[DATA_STATS_KEY]["source"] for b in raw}
    assert len(sources) == 2  # both workers reported
    for batch in raw:
        dm.on_before_batch_transfer(batch, 0)
    assert sorted(keys_of(raw)) == sorted(good_keys)
    assert dm.skipped_counts() == EXPECTED_SKIPS
    drain(loader, dm)  # a second epoch: same persistent workers, cumulative counts replace the first
    assert dm.skipped_counts() == {k: 2 * v for k, v in EXPECTED_SKIPS.items()}
    assert dm.samples_seen(None) == 2 * len(good_keys)


def test_warnings_are_rate_limited_and_dead_sources_fail_loudly(caplog) -> None:
    counter = SkipCounter("train")
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            counter.handle(SkipSample("corrupt_image", "bad bytes"))
    assert counter.counts == {"corrupt_image": 100} and len(caplog.records) == 3
    with pytest.raises(RuntimeError, match="shards in a row failed"):
        for i in range(MAX_CONSECUTIVE_SHARD_ERRORS):
            counter.handle(FileNotFoundError(2, "No such file", f"shard{i}.tar"))


def test_counts_survive_a_checkpoint_round_trip(tmp_path: Path) -> None:
    spec, good_keys = bad_shards(tmp_path)
    dm = make_dm(val_shards=spec, max_image_pixels=10_000)
    drain(dm.val_dataloader(), dm)
    state = dm.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    resumed = make_dm(val_shards=spec, max_image_pixels=10_000)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    drain(resumed.val_dataloader(), resumed)
    assert resumed.skipped_counts("val") == {k: 2 * v for k, v in EXPECTED_SKIPS.items()}
    assert resumed.samples_seen("val") == 2 * len(good_keys)


def test_unreadable_remote_shard_is_counted(tmp_path: Path) -> None:
    jpg_txt_shards(tmp_path, 1, 3)
    dm = make_dm(val_shards=[str(tmp_path / "00000.tar"), "pipe:exit 3"])
    assert len(keys_of(drain(dm.val_dataloader(), dm))) == 3
    assert dm.skipped_counts() == {"unreadable_shard": 1}


def test_setup_errors_name_the_pattern(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing-*.tar")
    with pytest.raises(ValueError, match="nothing-\\*.tar.*matches no shard"):
        make_dm(train_shards=missing, resampled=True, epoch_length=8)
    jpg_txt_shards(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="00002.tar does not exist"):
        make_dm(val_shards=pattern(tmp_path, 3))
    write_shard(tmp_path / "bad.tar", [{"__key__": "x", "txt": "caption without image"}])
    with pytest.raises(ValueError, match="bad.tar.*no usable sample.*missing_image"):
        make_dm(val_shards=str(tmp_path / "bad.tar"))
    with pytest.raises(ValueError, match="s3:"):
        make_dm(val_shards="s3://bucket/{0..3}.tar")
    with pytest.raises(ValueError, match="epoch_length"):
        WebDataModule(train_shards=pattern(tmp_path, 2), resampled=True)
    with pytest.raises(ValueError, match="lowres_size"):
        WebDataModule(image_size=32, lowres_size=64)


# ----------------------------------------------------------------------------------------- Lightning


class KeyRecorder(pl.LightningModule):
    """Records batch keys; fails if the data_stats entry reaches the model."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert DATA_STATS_KEY not in batch
        assert batch["image"].dtype == torch.float32 and batch["image"].min() >= -1
        self.keys += batch["key"]
        return (self.weight * batch["image"].mean()).sum() + self.weight.square().sum()

    def on_train_end(self) -> None:
        if self.out is not None:
            dm = self.trainer.datamodule
            record = {"keys": self.keys, "seen": dm.samples_seen(), "skipped": dm.skipped_counts()}
            (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: pl.LightningModule, dm: WebDataModule, **trainer_kw) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kw,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)


def test_lightning_pops_data_stats_and_counts_samples(tmp_path: Path) -> None:
    spec, good_keys = bad_shards(tmp_path)
    prepared = []
    dm = WebDataModule(
        train_shards=spec, image_size=32, batch_size=4, num_workers=2, resampled=True, epoch_length=32,
        shuffle_buffer=8, max_image_pixels=10_000, pin_memory=False, prepare=lambda: prepared.append(True),
        uint8_transfer=True,
    )  # fmt: skip
    model = KeyRecorder()
    fit(model, dm, devices=1)
    assert prepared == [True]
    assert len(model.keys) == 32 == dm.samples_seen()
    assert set(model.keys) <= set(good_keys)
    assert set(dm.skipped_counts()) <= set(EXPECTED_SKIPS) and dm.skipped_counts()


def test_ddp_ranks_receive_disjoint_shards(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(), out.mkdir()
    keys = jpg_txt_shards(data, 4, 4)  # 2 shards x 4 samples per rank: equal batch counts
    dm = WebDataModule(
        train_shards=pattern(data, 4), image_size=16, batch_size=2, num_workers=1, resampled=False,
        shuffle_buffer=4, pin_memory=False,
    )  # fmt: skip
    fit(KeyRecorder(out), dm, devices=2, strategy="ddp_fork")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    shards = [{key[:3] for key in rank["keys"]} for rank in ranks]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 2
    assert sorted(ranks[0]["keys"] + ranks[1]["keys"]) == sorted(keys)
    assert [rank["seen"] for rank in ranks] == [8, 8]


def test_imagenet_class_names_come_from_open_clip():
    from unclip.data.text import resolve_class_names

    names = resolve_class_names("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and all(isinstance(n, str) and n for n in names)


def test_shards_alone_make_a_working_module(tmp_path):
    """The defaults work for a user who passes only shards: each sample once per epoch, no epoch_length."""
    keys = jpg_txt_shards(tmp_path, 2, 3)
    dm = WebDataModule(train_shards=pattern(tmp_path, 2), batch_size=2, num_workers=0, pin_memory=False)
    dm.setup("fit")
    seen = keys_of(drain(dm.train_dataloader(), dm))
    assert len(seen) == 6 and sorted(seen) == sorted(keys)


def test_workers_started_by_forkserver_read_the_same_stream(tmp_path: Path) -> None:
    """`worker_start_method=forkserver` (the CPU data-parallel demo stages: a forked worker of a rank whose
    collective threads run can deadlock in fork): workers start that way and read what forked ones read."""
    keys = jpg_txt_shards(tmp_path, 2, 6, width=40, height=40)
    read = {}
    for method in ("fork", "forkserver"):
        dm = make_dm(val_shards=pattern(tmp_path, 2), val_batch_size=4, num_workers=2, worker_start_method=method)
        loader = dm.val_dataloader()
        assert loader.multiprocessing_context is not None
        assert loader.multiprocessing_context.get_start_method() == method
        read[method] = sorted(keys_of(drain(loader, dm)))
    assert read["fork"] == read["forkserver"] == sorted(keys)
