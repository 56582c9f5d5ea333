"""Training curves from run folders: what was logged is drawn, nothing else."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from unclip.plots import find_runs, plot_runs, quality_panels, read_metrics


def _write_run(root, name: str, rows: list[dict]) -> None:
    path = root / name / "csv" / "version_0"
    path.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_plots_every_stage_of_a_demo_folder(tmp_path):
    _write_run(tmp_path, "prior", [{"step": s, "train/loss": 1.0 / (s + 1)} for s in range(0, 100, 10)]
               + [{"step": 99, "val/loss": 0.2, "val/prior_cosine": 0.8, "val/text_cosine": 0.6}])
    _write_run(tmp_path, "decoder", [{"step": s, "train/loss": 0.1, "epoch": 0} for s in range(5)]
               + [{"step": 4, "val/loss": 0.1, "val/fd_clip": 3.0, "val/shapes_indist_all": 0.5}])
    _write_run(tmp_path, "clip", [{"step": 3, "train/loss": "nan"}, {"step": 4, "train/loss": 2.0}])
    assert [s for s, _ in find_runs([tmp_path])] == ["clip", "prior", "decoder"]  # pipeline order
    m = read_metrics(tmp_path / "prior")
    assert m["train/loss"][0] == (0, 1.0) and m["val/prior_cosine"] == [(99, 0.8)]
    assert read_metrics(tmp_path / "clip")["train/loss"] == [(4, 2.0)]  # non-finite values are left out
    written = plot_runs([tmp_path], tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "quality.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 200


def test_a_two_rank_decoder_gets_its_by_scene_panels(tmp_path):
    """Two data-parallel ranks log only the keys both have (`shapes_objects1_*`, `shapes_objects2_*`): those are
    drawn, each scene in its own panel, and nothing the run did not log."""
    _write_run(tmp_path, "decoder", [{"step": 999, "val/loss": 0.8, "val/recon_clip_cosine": 0.7,
                                      "val/shapes_objects1_colour": 1.0, "val/shapes_objects1_shape": 0.2,
                                      "val/shapes_objects2_relation": 0.6}])
    runs = find_runs([tmp_path])
    panels = quality_panels(runs, {run: read_metrics(run) for _, run in runs})
    assert [(title, keys) for _, _, title, keys in panels] == [
        ("ShapesEval, one object", ["val/shapes_objects1_colour", "val/shapes_objects1_shape"]),
        ("ShapesEval, two objects", ["val/shapes_objects2_relation"]),
        ("cos(CLIP(sample), its image embedding)", ["val/recon_clip_cosine"])]


def test_a_folder_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run with CSV logs"):
        plot_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        plot_runs([tmp_path / "missing"])
    _write_run(tmp_path, "prior", [{"step": 1, "epoch": 0}])  # the CSV exists, no number logged yet
    with pytest.raises(FileNotFoundError, match="no metrics logged yet"):
        plot_runs([tmp_path / "prior"])
    from unclip.plots import main

    with pytest.raises(SystemExit, match="plots: no metrics logged yet"):  # one line on the command line
        main([str(tmp_path / "prior")])


def test_a_run_of_one_step_still_shows_its_loss(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    _write_run(tmp_path, "prior", [{"step": 1, "train/loss": 0.5}])
    made = []
    original = plt.subplots

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plt, "subplots", spy)
    plot_runs([tmp_path / "prior"], tmp_path / "plots")
    line = made[0][1][0][0].get_lines()[-1]  # the loss figure's first panel, its smoothed line
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1]
