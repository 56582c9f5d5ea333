"""The denoising probe: x_0 predictions per noise level, scored against the images and by ShapesEval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unclip.data.shapes import make_sample
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.eval.denoise_probe import denoise_probe, format_rows, main


def shapes_batch(n: int = 12, size: int = 32):
    images, metas = [], []
    for i in range(n):
        image, caption, attributes = make_sample(0, "val", i, 128, max_objects=1, sizes=["large"])
        images.append(torch.from_numpy(np.asarray(image.resize((size, size)))).permute(2, 0, 1))
        metas.append({"caption": caption, "attributes": attributes})
    return torch.stack(images).float() / 127.5 - 1.0, metas


def test_probe_tells_a_denoiser_that_keeps_x_t_from_one_that_draws_the_mean():
    images, metas = shapes_batch()
    d = GaussianDiffusion(prediction_type="sample")  # what the net returns is its x_0
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))  # the probe's own noise

    def exact(x_t, t, index):  # knows the noise: its x_0 is the image at every t
        return d.target(images[index], noise[index], t)

    def mean_drawer(x_t, t, index):  # ignores x_t: the per-pixel mean image, a blob of every shape
        return d.target(images.mean(0, keepdim=True).expand(len(index), -1, -1, -1), noise[index], t)

    cond = {"index": torch.arange(len(images))}
    kept = denoise_probe(exact, d, images, cond, (20, 500), metas, batch_size=5)
    mean = denoise_probe(mean_drawer, d, images, cond, (20, 500), metas, batch_size=5)
    assert [r["t"] for r in kept] == [20, 500] and kept[0]["snr"] > 100 > kept[1]["snr"]
    assert max(r["mse"] for r in kept) < 1e-4 and all(r["shapes_indist_shape"] == 1.0 for r in kept)
    assert min(r["mse"] for r in mean) > 0.01 and all(r["shapes_indist_all"] < 0.5 for r in mean)
    table = format_rows(kept)
    assert table.splitlines()[0].startswith("| t | snr | mse |") and len(table.splitlines()) == 4


def test_probe_cli_on_a_trained_decoder(tiny_checkpoints, data_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    rows = main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar"),
                 "--t", "10", "900", "--num", "6", "--out", str(out)])
    assert [r["t"] for r in rows] == [10, 900] and json.loads(out.read_text()) == rows
    assert all(r["mse"] >= 0 for r in rows)
    assert "| 10 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar"),
              "--t", "1000"])
    with pytest.raises(SystemExit, match="denoise_probe: no shards"):
        main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(tmp_path / "none/*.tar")])
    with pytest.raises(SystemExit):  # argparse: nothing to probe
        main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar"),
              "--num", "0"])
    with pytest.raises(SystemExit, match="denoise_probe: .*prior"):  # a prior checkpoint: refused in one line
        main(["--ckpt", str(tiny_checkpoints["prior"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar")])


def test_probe_cli_by_scene_groups_one_object_scenes_by_size(tiny_checkpoints, data_dir, capsys):
    from unclip.eval.denoise_probe import scene_group

    assert scene_group({"attributes": {"objects": [{"size": "small"}]}}) == "objects1_small"
    assert scene_group({"attributes": {"objects": [{"size": "large"}, {"size": "small"}]}}) == "objects2"
    rows = main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar"),
                 "--t", "10", "--num", "8", "--by-scene"])
    groups = [r["group"] for r in rows]
    assert groups == sorted(groups) and all(g == "objects2" or g.startswith("objects1_") for g in groups)
    out = capsys.readouterr().out
    assert all(f"{g} (" in out for g in groups) and len(groups) == out.count("| t | snr | mse |")


def test_probe_cli_clip_replaces_the_recorded_clip_and_is_checked(tiny_checkpoints, data_dir):
    """`--clip` reaches the pipeline: a CLIP other than the decoder's own is refused by its fingerprint check."""
    with pytest.raises(SystemExit, match="CLIP mismatch"):
        main(["--ckpt", str(tiny_checkpoints["decoder"]), "--shards", str(data_dir / "shapes_tiny/val/*.tar"),
              "--t", "10", "--num", "4", "--clip", str(tiny_checkpoints["clip"])])
