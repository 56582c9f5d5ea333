"""The `shapes` generator: determinism, held-out split, captions, geometry, shard layout, ensure_shapes, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from unclip.data.shapes import (
    CELL_MARGIN,
    HELDOUT_PAIRS,
    SPLITS,
    ensure_shapes,
    make_caption,
    parse_caption,
    read_manifest,
    relation_holds,
    sample_rng,
    sample_scene,
    write_shapes,
)
from unclip.data.shapes_render import BACKGROUNDS, COLOURS, SHAPES, render_scene

SMALL = dict(num_train=60, num_val=20, num_heldout=20, shard_size=25, image_size=64, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(split: str, num: int, seed: int = 0) -> list[dict]:
    return [sample_scene(sample_rng(seed, split, i), split) for i in range(num)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    write_shapes(out, **SMALL)
    return out


def test_same_seed_same_bytes_parallel_or_not(dataset: Path, tmp_path: Path) -> None:
    write_shapes(tmp_path / "again", **SMALL, num_workers=2)
    first, again = _files(dataset), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(first[name] == again[name] for name in first), "a file differs between identical runs"


def test_different_seed_different_shards(dataset: Path, tmp_path: Path) -> None:
    write_shapes(tmp_path / "other", **{**SMALL, "num_train": 25, "num_val": 0, "num_heldout": 0}, seed=1)
    assert (dataset / "train/00000.tar").read_bytes() != (tmp_path / "other/train/00000.tar").read_bytes()


def test_heldout_pairs_only_in_heldout_split() -> None:
    pairs = lambda scene: {(o["colour"], o["shape"]) for o in scene["objects"]}
    for split in ("train", "val"):
        assert not any(pairs(s) & set(HELDOUT_PAIRS) for s in _scenes(split, 2000))
    heldout = _scenes("heldout", 500)
    assert all(pairs(s) & set(HELDOUT_PAIRS) and s["heldout"] for s in heldout)
    seen = set().union(*(pairs(s) for s in _scenes("train", 2000)))
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES), "a word never trains"
    assert len({c for c, _ in HELDOUT_PAIRS}) == len({s for _, s in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)


def test_scenes_are_geometrically_consistent() -> None:
    for scene in _scenes("train", 1000) + _scenes("heldout", 300):
        objects = scene["objects"]
        for o in objects:
            for centre, cell in zip(o["center"], (o["col"], o["row"])):
                # Inside its own grid cell, with the margin that keeps neighbours apart.
                low, high = centre - o["scale"] / 2, centre + o["scale"] / 2
                assert cell / 3 + CELL_MARGIN - 1e-6 <= low and high <= (cell + 1) / 3 - CELL_MARGIN + 1e-6
        if len(objects) == 2:
            a, b = objects
            assert (a["row"], a["col"]) != (b["row"], b["col"])
            assert relation_holds(scene["relation"], a, b)
            axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[scene["relation"]]
            gap = sign * (b["center"][axis] - a["center"][axis]) - (a["scale"] + b["scale"]) / 2
            assert gap >= 2 * CELL_MARGIN - 1e-6, "the relation holds for the whole boxes, not just centres"


def _samples(root: Path, split: str) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in (root / split).glob("*.tar")), shardshuffle=False))


def test_captions_agree_with_json(dataset: Path) -> None:
    checked = 0
    for split in SPLITS:
        for sample in _samples(dataset, split):
            caption, meta = sample["txt"].decode(), json.loads(sample["json"])
            truth, parsed = meta["attributes"], parse_caption(caption)
            assert meta["caption"] == caption and parsed["stated"] == truth["stated"], caption
            assert {"shape", "colour"} <= set(truth["stated"])
            assert ("position" in truth["stated"]) == ("size" in truth["stated"]) or len(truth["objects"]) == 2
            assert ("relation" in truth["stated"]) == (len(truth["objects"]) == 2)
            assert len(parsed["objects"]) == len(truth["objects"])
            for got, want in zip(parsed["objects"], truth["objects"]):
                assert got == {k: want[k] for k in got}, caption
                assert set(got) >= {a for a in ("shape", "colour", "size", "position") if a in truth["stated"]}
            assert parsed["relation"] == truth["relation"]
            assert parsed["background"] == (truth["background"] if "background" in truth["stated"] else None)
            assert parsed["heldout"] == truth["heldout"] == (split == "heldout")
            checked += 1
    assert checked == 100
    for i in range(500):  # more captions than the shards hold, without rendering
        rng = sample_rng(3, "train", i)
        scene = sample_scene(rng, "train")
        caption, stated = make_caption(rng, scene)
        parsed = parse_caption(caption)
        assert parsed["stated"] == stated and parsed["relation"] == scene["relation"], caption


def test_parse_free_text_and_errors() -> None:
    assert parse_caption("A red circle.")["objects"] == [{"shape": "circle", "colour": "red"}]
    two = parse_caption("a big blue star above a tiny green cross on a grey background")
    assert two["relation"] == "above" and two["background"] == "gray" and two["objects"][1]["size"] == "small"
    assert parse_caption("a pink disk in the lower-right corner")["objects"][0]["position"] == "bottom right"
    for bad in ("hello world", "a circle", "a red circle and a blue square", "a red circle on a blue background",
                "a red circle left of a blue square above a green star", "a red circle at the top bottom"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_render_is_antialiased() -> None:
    scene = {"background": "white", "objects": [{"shape": "circle", "colour": "blue", "center": [0.5, 0.5],
                                                  "scale": 0.5}]}
    image = render_scene(scene, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    red = image[..., 0].astype(int)
    blue_r, white_r = COLOURS["blue"][0], BACKGROUNDS["white"][0]
    edge = (red > blue_r + 5) & (red < white_r - 5)
    assert 40 < edge.sum() < 200, "the rim of a 32 px disc has partially covered pixels"
    assert abs((white_r - red).sum() / (white_r - blue_r) - np.pi * 16**2) < 3, "coverage integrates to the area"


def test_shard_layout_reads_back(dataset: Path) -> None:
    manifest = read_manifest(dataset)
    assert manifest["options"]["image_size"] == 64 and manifest["heldout_pairs"] == [list(p) for p in HELDOUT_PAIRS]
    for split, num in (("train", 60), ("val", 20), ("heldout", 20)):
        shards = sorted(p.name for p in (dataset / split).glob("*.tar"))
        expected = [f"{i:05d}.tar" for i in range(-(-num // 25))]
        assert shards == expected and manifest["splits"][split] == {"num_samples": num, "num_shards": len(expected)}
        stats = [json.loads((dataset / split / f"{i:05d}_stats.json").read_text()) for i in range(len(shards))]
        assert sum(s["count"] for s in stats) == sum(s["successes"] for s in stats) == num
        assert all(s["failed_to_download"] == 0 for s in stats)
        samples = _samples(dataset, split)
        assert len(samples) == num
        for index, sample in enumerate(samples):
            key = f"{index // 25:05d}{index % 25:04d}"
            assert sample["__key__"] == key and {"jpg", "txt", "json"} <= set(sample)
            meta = json.loads(sample["json"])
            assert meta["key"] == key and meta["status"] == "success" and meta["split"] == split
            assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"]) == (64, 64)


def test_ensure_shapes_regenerates_only_on_change(tmp_path: Path) -> None:
    out = tmp_path / "data"
    options = {**SMALL, "num_train": 10, "num_val": 5, "num_heldout": 5, "shard_size": 10}
    first = ensure_shapes(out, **options)
    stamp = (out / "manifest.json").stat().st_mtime_ns, (out / "train/00000.tar").stat().st_ino
    assert ensure_shapes(out, **options) == first
    assert ((out / "manifest.json").stat().st_mtime_ns, (out / "train/00000.tar").stat().st_ino) == stamp
    changed = ensure_shapes(out, **{**options, "seed": 5})
    assert changed["options"]["seed"] == 5 and read_manifest(out) == changed
    (out / "manifest.json").unlink()  # an interrupted or damaged dataset is rebuilt
    assert ensure_shapes(out, **{**options, "seed": 5}) == changed
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["data"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_shapes(tmp_path / "mine", **options)


def test_ensure_shapes_concurrent_calls(tmp_path: Path) -> None:
    options = {**SMALL, "num_train": 20, "num_val": 5, "num_heldout": 5}
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_shapes(tmp_path / "d", **options)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] == read_manifest(tmp_path / "d")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "temporary folders are cleaned up"


def test_cli_writes_only_out_dir(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "unclip.data.shapes", "out_dir=ds", "num_train=8", "num_val=2", "num_heldout=2",
           "image_size=64", "shard_size=4", "progress=false"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"], "no Hydra run folder, no chdir"
    assert read_manifest(tmp_path / "ds")["splits"]["train"] == {"num_samples": 8, "num_shards": 2}
