"""Linear probes of embedded `shapes` shards: they find what an embedding encodes, and only that."""

import io
import json
import tarfile

import numpy as np
import pytest

from unclip.data.shapes import POSITIONS
from unclip.data.shapes_render import COLOURS, SHAPES
from unclip.eval.linear_probe import main, probe_report, read_embedded_shapes


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def add_sample(tar: tarfile.TarFile, i: int, attributes: dict, image: np.ndarray, text: np.ndarray) -> None:
    """One embedded `shapes` sample as `python -m unclip.data.embed` writes it: json and both embeddings."""
    members = {"json": json.dumps({"attributes": attributes}).encode(),
               "image_embed.npy": _npy(image.astype(np.float16)), "text_embed.npy": _npy(text.astype(np.float16))}
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{i:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_shard(path, n: int, seed: int, two_object_every: int = 0, size_flips_shape: bool = False) -> None:
    """Samples whose image embedding encodes the shape linearly (one-hot + noise) and the position not at all;
    the text embedding encodes the position. `size_flips_shape`: half the samples are small, and their shape's
    sign is flipped, so shape is linear within each size and not across sizes."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            shape, pos = SHAPES[rng.integers(len(SHAPES))], POSITIONS[rng.integers(len(POSITIONS))]
            size = "small" if size_flips_shape and rng.random() < 0.5 else "large"
            image = rng.normal(size=16) * 0.3
            image[SHAPES.index(shape)] += -2.0 if size == "small" else 2.0
            image[15] += 2.0 if size == "small" else 0.0
            text = rng.normal(size=16) * 0.3
            text[POSITIONS.index(pos)] += 2.0
            obj = {"shape": shape, "colour": colours[i % len(colours)], "size": size, "position": pos}
            objects = [obj, dict(obj)] if two_object_every and i % two_object_every == 0 else [obj]
            add_sample(tar, i, {"background": "white", "objects": objects}, image, text)


def test_the_probe_reads_what_each_embedding_encodes(tmp_path, capsys):
    write_shard(tmp_path / "train.tar", 600, seed=0, two_object_every=5)
    write_shard(tmp_path / "test.tar", 200, seed=1)
    embeds, labels = read_embedded_shapes(str(tmp_path / "train.tar"))
    assert embeds["image_embed"].shape == (480, 16) and len(labels["shape"]) == 480  # two-object scenes left out
    report = probe_report(str(tmp_path / "train.tar"), str(tmp_path / "test.tar"))
    assert report["shape"]["image_embed"] > 0.95 and report["shape"]["text_embed"] < 0.4
    assert report["position"]["text_embed"] > 0.95 and report["position"]["image_embed"] < 0.3
    assert report["shape"]["classes"] == len(SHAPES) and 0 < report["shape"]["chance"] < 0.4
    assert "size" not in report and "background" not in report  # one class each: nothing to probe
    main(["--train", str(tmp_path / "train.tar"), "--test", str(tmp_path / "test.tar"), "--out",
          str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text())["shape"]["image_embed"] > 0.95
    assert "position" in capsys.readouterr().out


def test_within_size_finds_a_shape_code_that_depends_on_the_size(tmp_path, capsys):
    write_shard(tmp_path / "train.tar", 800, seed=0, size_flips_shape=True)
    write_shard(tmp_path / "test.tar", 300, seed=1, size_flips_shape=True)
    report = probe_report(str(tmp_path / "train.tar"), str(tmp_path / "test.tar"), within="size")
    assert report["size"]["image_embed"] > 0.95
    assert report["shape"]["image_embed"] < 0.6  # one probe over both sizes: each shape's sign cancels out
    for size in ("small", "large"):
        row = report[f"shape@size={size}"]
        assert row["image_embed"] > 0.95 and row["text_embed"] < 0.4 and 100 < row["test"] < 200
        assert f"size@size={size}" not in report  # one class within a size: nothing to probe
    with pytest.raises(ValueError, match="within must be one of"):
        probe_report(str(tmp_path / "train.tar"), str(tmp_path / "test.tar"), within="texture")
    main(["--train", str(tmp_path / "train.tar"), "--test", str(tmp_path / "test.tar"), "--within", "size"])
    assert "shape@size=small" in capsys.readouterr().out


def write_pair_shard(path, n: int, seed: int) -> None:
    """Two-object scenes of two different colours side by side: the image embedding holds the left object's
    colour (one-hot + noise), the text embedding only which two colours the scene holds (a bag: no order)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    with tarfile.open(path, "w") as tar:
        for i in range(n + 20):
            if i < 20:  # a few one-object scenes: the one-object probes still run beside the pair probes
                objects = [{"shape": SHAPES[i % 3], "colour": colours[i % 4], "size": "large", "position": "left",
                            "center": [0.2, 0.5]}]
                image, text = rng.normal(size=16), rng.normal(size=16)
            else:
                a, b = rng.choice(len(colours), size=2, replace=False)
                xs = rng.permutation([0.2, 0.8])
                objects = [{"shape": "circle", "colour": colours[c], "size": "large", "position": "left",
                            "center": [float(x), 0.5]} for c, x in zip((a, b), xs)]
                left = a if xs[0] < xs[1] else b
                image, text = rng.normal(size=16) * 0.3, rng.normal(size=16) * 0.3
                image[left] += 2.0
                text[a] += 2.0
                text[b] += 2.0
            relation = None if len(objects) == 1 else ("left of" if xs[0] < xs[1] else "right of")
            add_sample(tar, i, {"background": "white", "objects": objects, "relation": relation}, image, text)


def test_two_object_probe_tells_a_bound_embedding_from_a_bag(tmp_path, capsys):
    write_pair_shard(tmp_path / "train.tar", 800, seed=0)
    write_pair_shard(tmp_path / "test.tar", 300, seed=1)
    report = probe_report(str(tmp_path / "train.tar"), str(tmp_path / "test.tar"), two_objects=True)
    row = report["colour@left"]
    assert row["bag"] == 0.5 and row["test"] == 300  # two different colours: a bag can only guess between them
    assert row["image_embed"] > 0.95  # it names the left object's colour
    assert abs(row["text_embed"] - 0.5) < 0.1  # it knows both colours, not which is left
    assert "shape@left" not in report  # one shape in every scene: nothing to probe
    assert "colour@top" not in report  # every relation is horizontal: no scene states which object is higher
    assert "shape" in report  # the one-object rows are still there
    main(["--train", str(tmp_path / "train.tar"), "--test", str(tmp_path / "test.tar"), "--two-objects"])
    assert "colour@left" in capsys.readouterr().out


def test_shards_that_are_not_embedded_shapes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        read_embedded_shapes(str(tmp_path / "*.tar"))
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        info = tarfile.TarInfo("000000.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cap"))
    with pytest.raises(FileNotFoundError, match="unclip.data.embed"):
        read_embedded_shapes(str(tmp_path / "plain.tar"))


def test_shard_reading_matches_the_loader_and_names_bad_shards(tmp_path, capsys):
    from unclip.data.shards import read_tar_samples

    with tarfile.open(tmp_path / "dot.tar", "w") as tar:  # members as `tar -C dir -T list` writes them
        for name, data in (("./000001.json", b"{}"), ("./000001.image_embed.npy", b"x"), ("a.b/000002.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_tar_samples(str(tmp_path / "dot.tar")) == {"./000001": {"json": b"{}", "image_embed.npy": b"x"},
                                                         "a.b/000002": {"txt": b"c"}}
    write_shard(tmp_path / "train.tar", 60, seed=0)
    data = (tmp_path / "train.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])  # inside a member's data
    # inside the second sample's first header, where tarfile ends quietly
    (tmp_path / "cuthead.tar").write_bytes(data[: 6 * tarfile.BLOCKSIZE + 3])
    (tmp_path / "empty.tar").write_bytes(b"")
    for bad in ("cut.tar", "cuthead.tar", "empty.tar"):
        with pytest.raises(ValueError, match=f"{bad}: not a readable tar shard"):
            read_tar_samples(str(tmp_path / bad))
    with pytest.raises(SystemExit, match="empty.tar: not a readable tar shard"):
        main(["--train", str(tmp_path / "empty.tar"), "--test", str(tmp_path / "train.tar")])
    # one class per attribute: an empty report is an error, not a header; no two-object scenes: a note
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        for i in range(20):
            obj = {"shape": "circle", "colour": "red", "size": "large", "position": "center"}
            add_sample(tar, i, {"background": "white", "objects": [obj]}, np.ones(16), np.ones(16))
    with pytest.raises(SystemExit, match="nothing to probe"):
        main(["--train", str(tmp_path / "one.tar"), "--test", str(tmp_path / "train.tar")])
    main(["--train", str(tmp_path / "train.tar"), "--test", str(tmp_path / "train.tar"), "--two-objects"])
    out = capsys.readouterr().out
    assert "no two-object rows" in out and "shape" in out
