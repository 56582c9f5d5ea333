"""evaluate.py for every stage and the pipeline, training-time evaluation, W&B offline, and the demo path."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from unclip.evaluate import evaluate

from .conftest import ROOT, train_stage


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """A machine without the Inception weights (and no way to download them)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_evaluate_writes_a_report_for_each_stage(stage, tiny_checkpoints, compose_cfg, tmp_path, no_inception):
    overrides = [f"ckpt={tiny_checkpoints[stage]}", "data=shapes_tiny", "num_samples=12", "batch_size=6",
                 "num_workers=0", "decoder_sampler.num_steps=3", "prior_sampler.num_steps=3",
                 "upsampler_samplers=[{num_steps: 2}]"]
    cfg = compose_cfg("evaluate", overrides, tmp_path)
    start = time.monotonic()
    result = evaluate(cfg)
    assert time.monotonic() - start < 120
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "eval.md").is_file() and result["stage"] == stage
    metrics = report["metrics"]
    expected = {
        "clip": {"t2i_r1", "i2t_r5", "zeroshot_colour", "swap_colour"},
        "prior": {"prior_cosine", "text_cosine", "unrelated_cosine", "prior_retrieval_top1"},
        "decoder": {"clip_score", "fd_clip", "recon_clip_cosine", "shapes_indist_colour"},  # 32 px: no shape
        "upsampler": {"psnr", "psnr_bicubic", "psnr_gain_db", "shapes_indist_all"},
    }[stage]
    assert expected <= set(metrics), set(metrics)
    assert all(v is None or isinstance(v, float) for v in metrics.values())
    if stage in ("decoder", "upsampler"):
        assert "fid" not in metrics and "is_mean" not in metrics  # no Inception weights here
        reason = json.dumps(report)
        assert "weights-inception-2015-12-05-6726825d.pth" in reason and "inception_weights" in reason
        assert (tmp_path / "samples.png").is_file()


def test_decoder_shapes_judged_at_a_larger_side(tiny_checkpoints, compose_cfg, tmp_path, no_inception):
    """shapes_judge_size=64: the 32 px reconstructions are judged on shape after a bicubic resize, beside the
    real images through the same resize (the judge's ceiling there); a side below the decoder's is refused."""
    base = [f"ckpt={tiny_checkpoints['decoder']}", "data=shapes_tiny", "num_samples=12", "batch_size=6",
            "num_workers=0", "decoder_sampler.num_steps=2", "metrics=[]"]
    metrics = evaluate(compose_cfg("evaluate", [*base, "shapes_judge_size=64"], tmp_path / "a"))["metrics"]
    assert {"shapes_indist_shape", "shapes_indist_all", "shapes_real_indist_shape"} <= set(metrics), set(metrics)
    assert metrics["shapes_real_indist_colour"] == 1.0 and metrics["shapes_real_indist_shape"] >= 0.75
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["shapes_judge_size"] == 64
    with pytest.raises(ValueError, match="shapes_judge_size=16"):
        evaluate(compose_cfg("evaluate", [*base, "shapes_judge_size=16"], tmp_path / "b"))


def test_evaluate_is_deterministic(tiny_checkpoints, compose_cfg, tmp_path, no_inception):
    runs = []
    for i in range(2):
        cfg = compose_cfg("evaluate", [f"ckpt={tiny_checkpoints['prior']}", "data=shapes_tiny", "num_samples=8",
                                       "batch_size=8", "num_workers=0", "prior_sampler.num_steps=3"], tmp_path / str(i))
        runs.append(evaluate(cfg)["metrics"])
    assert runs[0] == runs[1]


def test_evaluate_pipeline_text_to_image(tiny_checkpoints, compose_cfg, tmp_path, no_inception):
    cfg = compose_cfg("evaluate", [
        f"pipeline.prior={tiny_checkpoints['prior']}", f"pipeline.decoder={tiny_checkpoints['decoder']}",
        f"pipeline.upsamplers=[{tiny_checkpoints['upsampler']}]", "data=shapes_tiny", "num_samples=8",
        "batch_size=8", "num_workers=0", "prior_sampler.num_steps=3", "decoder_sampler.num_steps=3",
        "upsampler_samplers=[{num_steps: 2}]"], tmp_path)
    metrics = evaluate(cfg)["metrics"]
    assert {"clip_score", "fd_clip", "shapes_indist_all", "shapes_decoder_indist_colour"} <= set(metrics)
    assert "shapes_decoder_indist_all" not in metrics  # the 32 px decoder output is not judged on shape
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_samples"] == 8 and set(report["checkpoints"]) >= {"prior", "decoder", "upsampler", "clip"}
    samplers = report["samplers"]  # as used: the overrides above over each checkpoint's own settings
    assert [samplers[s]["num_steps"] for s in ("prior", "decoder", "upsampler")] == [3, 3, 2]
    assert samplers["decoder"]["name"] and samplers["decoder"]["cond_scale"] is not None
    for name in ("shapes", "shapes_decoder"):  # one record per judged image, final and 32 px decoder output
        lines = (tmp_path / f"{name}_scenes.jsonl").read_text().splitlines()
        assert report["shapes_scenes"][name] == str(tmp_path / f"{name}_scenes.jsonl") and len(lines) == 8
        scene = json.loads(lines[0])
        assert scene["caption"] and set(scene["checks"]) >= {"colour", "count"} and "objects" in scene["read"]
    assert any(json.loads(line)["side"] == 32 for line in (tmp_path / "shapes_decoder_scenes.jsonl").open())


def test_nothing_to_evaluate_is_a_clear_error(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(compose_cfg("evaluate", [], tmp_path))


def test_training_time_evaluation_logs_curves(tmp_path, data_dir, no_inception):
    result = train_stage("tiny_decoder", tmp_path, data_dir, [
        "callbacks=with_eval", "callbacks.generation_eval.num_samples=8", "callbacks.ema.decay=0.9",
        "callbacks.model_checkpoint.every_n_train_steps=4", "trainer.max_steps=8", "trainer.val_check_interval=4",
        "model.sampler.num_steps=3", "data.val_batch_size=8", "model.warmup_steps=2"])
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"val/clip_score", "val/fd_clip", "val/eval_samples", "val/shapes_indist_colour", "val/loss",
            "train/loss", "train/grad_norm", "val/recon_clip_cosine"} <= logged
    steps = [r["step"] for r in rows if r.get("val/clip_score")]
    assert len(steps) == 2  # a curve: one point per validation run
    assert "val/fid" not in logged  # Inception weights unavailable here: reported, not faked
    assert result["global_step"] == 8


def test_wandb_logger_runs_offline_and_writes_a_run_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_stage("tiny_prior", tmp_path, data_dir, ["logger=wandb", "trainer.max_steps=3"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_the_demo_path_end_to_end(tmp_path, data_dir):
    env = {**os.environ, "UNCLIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th")}
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--fast", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "samples" / "grid.png").is_file() and len(list((out / "samples" / "images").glob("*.png"))) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert {"clip_score", "fd_clip"} <= set(summary["metrics"])
    assert summary["steps"] == {"clip": 4, "prior": 4, "decoder": 4, "upsampler": 4}  # FAST's trainer.max_steps
    assert summary["matmul_gflops"] > 0 and summary["target_steps"] == {}
    # the prior and the decoder trained on the finished CLIP's precomputed embeddings of every split
    for split in ("train", "val", "heldout"):
        stats = json.loads((out / "data" / "embed" / split / "embed_stats.json").read_text())
        assert stats["count"] > 0 and stats["text_tokens"]
    overrides = (out / "decoder" / ".hydra" / "overrides.yaml").read_text()
    assert "data.precomputed=[image_embed,text_tokens,text_mask]" in overrides and "embed/train" in overrides
    assert "samples" in proc.stdout and str(out / "eval" / "eval.md") in proc.stdout
    # the cpu preset's six bars, each judged against the fast run's own figures
    bars = {r["key"]: r for r in summary["bars"]}
    assert set(bars) == {"shapes_indist_colour", "shapes_indist_position", "shapes_indist_background",
                         "shapes_indist_shape", "shapes_indist_all", "shapes_heldout_colour"}
    assert all(r["value"] == summary["metrics"][k] and r["met"] == (r["value"] >= r["bar"]) for k, r in bars.items())
    assert f"bars        {sum(r['met'] for r in bars.values())} of 6 met" in proc.stdout


def test_evaluate_takes_one_shard_pattern_as_a_string(tiny_checkpoints, compose_cfg, tmp_path, data_dir):
    """`shards='data/.../*.tar'` (one pattern, as the docs write it) as well as a list."""
    pattern = str(data_dir / "shapes_tiny" / "heldout" / "*.tar")
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_checkpoints['clip']}", "data=shapes_tiny", f"shards={pattern}",
                                   "num_samples=12", "batch_size=6", "num_workers=0"], tmp_path)
    evaluate(cfg)
    assert json.loads((tmp_path / "eval.json").read_text())["shards"] == [pattern]
