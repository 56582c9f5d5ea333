"""The GPU benchmark scripts (bench/train_throughput.py, bench/sampling_speed.py) at tiny sizes on CPU: their
JSON records have the fields the performance docs read, with sane values, and the training step is formed as
the stage systems form it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import sampling_speed  # noqa: E402
import train_throughput  # noqa: E402

TINY = ["--device", "cpu", "--precision", "fp32"]  # CPU bf16 autocast is slow without native bf16 units
TRAIN_FIELDS = {
    "name", "preset", "stage", "batch", "compile", "optimizer", "ema", "clip_norm", "precision", "params",
    "flops_per_sample_fwd", "flops_per_sample_fwd_bwd", "warmup_steps", "timed_steps", "first_step_s", "ms_per_step",
    "ms_per_step_median", "samples_per_s", "mfu", "peak_memory_gib", "graph_breaks", "host_syncs_per_step",
    "loss_finite", "peer_samples_per_s", "ratio_to_peer",
}
SAMPLING_FIELDS = {
    "name", "group", "row", "stage", "preset", "compile", "samples", "net_batch", "steps", "cond_scale", "seconds",
    "runs_s", "first_run_s", "samples_per_s", "ms_per_step", "host_syncs", "host_syncs_per_step", "sync_sites",
    "peer_s", "speedup_vs_peer",
}


pytestmark = pytest.mark.usefixtures("single_thread")


def check_environment(doc: dict, argv: list[str], kind: str) -> None:
    assert doc["benchmark"] == kind
    assert doc["argv"][1:] == argv
    assert doc["torch"] == torch.__version__ and doc["device"] == "cpu" and doc["device_name"]


# ---------------------------------------------------------------------- training throughput
def test_train_records(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = [*TINY, "--preset", "prior_tiny", "decoder_tiny", "upsampler_tiny", "--batch", "4", "4", "2",
            "--steps", "2", "--warmup", "1", "--optim", "fused", "foreach", "--extras", "none", "ema+clip",
            "--out", str(out)]
    train_throughput.main(argv)
    doc = json.loads(out.read_text())
    check_environment(doc, argv, "train_throughput")
    records = doc["records"]
    assert len(records) == 3 * 2 * 2 and len({r["name"] for r in records}) == len(records)
    for r in records:
        assert TRAIN_FIELDS <= set(r), TRAIN_FIELDS - set(r)
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and r["timed_steps"] == 2 and r["warmup_steps"] == 1
        assert math.isclose(r["samples_per_s"], r["batch"] / r["ms_per_step"] * 1e3)
        assert 2 * r["flops_per_sample_fwd"] <= r["flops_per_sample_fwd_bwd"] <= 3.5 * r["flops_per_sample_fwd"]
        assert 0 < r["mfu"] < 1 and r["loss_finite"]
        assert r["params"] == sum(p.numel() for p in train_throughput.build_net(r["preset"]).parameters())
        assert r["peak_memory_gib"] is None and r["host_syncs_per_step"] is None  # CUDA-only measurements
        assert r["graph_breaks"] is None and not r["compile"]
        assert r["peer_samples_per_s"] is None and r["ratio_to_peer"] is None
    assert {r["stage"] for r in records} == {"prior", "decoder", "upsampler"}
    assert {(r["ema"], r["clip_norm"]) for r in records} == {(False, None), (True, 1.0)}
    upsampler = next(r for r in records if r["stage"] == "upsampler")
    assert upsampler["crop"] == 32 // 4  # trained on quarter-size crops, as the system does
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("upsampler_tiny B=2 eager foreach+ema+clip")  # the table comes last


@pytest.mark.slow
def test_train_compiled_bf16(tmp_path):
    """bf16 autocast and torch.compile (aot_eager on CPU): a graph without breaks, the first step reported."""
    out = tmp_path / "train.json"
    argv = ["--device", "cpu", "--preset", "prior_tiny", "decoder_tiny", "--batch", "2", "--steps", "1",
            "--warmup", "1", "--optim", "fused", "--compile", "both", "--compile-backend", "aot_eager",
            "--out", str(out)]
    records = train_throughput.main(argv)
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(records))
    assert [r["compile"] for r in records] == [False, True, False, True]
    for r in records:
        assert r["precision"] == "bf16" and r["loss_finite"] and r["first_step_s"] > 0
        assert (r["graph_breaks"], r["graphs"]) == ((0, 1) if r["compile"] else (None, None))


def test_train_peer_ratio(tmp_path, monkeypatch):
    """The ratio to the peer is ours / the peer's samples/s, for the mode the peer timed at the same batch."""
    monkeypatch.setitem(train_throughput.PEER_TRAIN, ("prior_tiny", 2), {"eager": 10.0, "params": 1, "flops": 1.0})
    [r] = train_throughput.main([*TINY, "--preset", "prior_tiny", "--batch", "2", "--steps", "1", "--warmup", "1",
                                 "--optim", "foreach"])
    assert r["peer_samples_per_s"] == 10.0 and math.isclose(r["ratio_to_peer"], r["samples_per_s"] / 10.0)


def test_train_budget_skips(tmp_path, capsys):
    records = train_throughput.main([*TINY, "--preset", "prior_tiny", "--batch", "2", "--budget-s", "0"])
    assert [r["error"] for r in records] == ["skipped: --budget-s"] * 2
    assert "skipped" in capsys.readouterr().out.splitlines()[-1]


def test_train_failure_is_recorded(monkeypatch, capsys):
    """A configuration that fails (here: a stand-in for a compile error) is recorded; the others still run."""
    run = train_throughput.Bench.run

    def flaky(self, optim, *args, **kwargs):
        if optim == "fused":
            raise RuntimeError("backend failed")
        return run(self, optim, *args, **kwargs)

    monkeypatch.setattr(train_throughput.Bench, "run", flaky)
    records = train_throughput.main([*TINY, "--preset", "prior_tiny", "--batch", "2", "--steps", "1", "--warmup", "1"])
    assert records[0]["error"] == "RuntimeError: backend failed" and records[1]["samples_per_s"] > 0
    assert "RuntimeError: backend failed" in capsys.readouterr().out


def test_train_step_inputs_follow_the_systems():
    """Drop masks at the stage configs' rates, x_0 of the prior on the sqrt(D) sphere, unit image embeddings."""
    torch.manual_seed(0)
    for preset, stage in (("prior_tiny", "prior"), ("decoder_tiny", "decoder"), ("upsampler_tiny", "upsampler")):
        net = train_throughput.build_net(preset)
        assert train_throughput.stage_of(net) == stage
        settings = train_throughput.stage_settings(stage)
        diffusion = train_throughput.build_diffusion(settings)
        normalizer = train_throughput.EmbedNormalizer(net.config.get("embed_dim") or 1) if stage == "prior" else None
        data = train_throughput.random_data(net, stage, 20_000 if stage != "upsampler" else 2, torch.device("cpu"),
                                            channels_last=False, crop=8 if stage == "upsampler" else None)
        x0, cond = train_throughput.step_inputs(stage, net.config, data, settings, diffusion, normalizer)
        if stage == "prior":
            assert torch.allclose(x0.norm(dim=-1), torch.full((x0.shape[0],), math.sqrt(x0.shape[1])), rtol=1e-4)
            assert abs(cond["cond_drop_mask"].float().mean() - settings["cond_drop_prob"]) < 0.01
            assert cond["text_mask"].all() and cond["text_tokens"].shape[1] == net.config["num_text_tokens"]
        elif stage == "decoder":
            assert x0.min() >= -1 and x0.max() <= 1 and x0.shape[-1] == net.config["image_size"]
            assert torch.allclose(cond["image_embed"].norm(dim=-1), torch.ones(x0.shape[0]), atol=1e-5)
            assert abs(cond["image_embed_drop_mask"].float().mean() - settings["image_drop_prob"]) < 0.01
            assert abs(cond["text_drop_mask"].float().mean() - settings["text_drop_prob"]) < 0.015
        else:
            assert x0.shape[-1] == 8 and cond["lowres_image"].shape == x0.shape
            assert (cond["noise_level"] == 0).all()
        out = diffusion.training_losses(net, x0[:2], **{k: v[:2] for k, v in cond.items()})
        assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
        assert diffusion.prediction_type == settings["diffusion"]["prediction_type"]


def test_flops_scale_with_batch():
    net = train_throughput.build_net("decoder_tiny")
    settings = train_throughput.stage_settings("decoder")
    diffusion = train_throughput.build_diffusion(settings)
    per_sample = []
    for batch in (1, 3):
        data = train_throughput.random_data(net, "decoder", batch, torch.device("cpu"), channels_last=False)
        x0, cond = train_throughput.step_inputs("decoder", net.config, data, settings, diffusion, None)
        fwd, total = train_throughput.count_flops(net, x0, cond)
        per_sample.append((fwd / batch, total / batch))
    assert per_sample[0] == pytest.approx(per_sample[1], rel=1e-6) and per_sample[0][0] > 0


def test_import_chain_stays_light():
    """Neither script pulls CLIP, Hydra, WebDataset, W&B or diffusers in at import (the GPU host lacks them),
    and a training run needs only diffusers (GaussianDiffusion's schedule) among them."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import sampling_speed, train_throughput\n"
        "heavy = {'open_clip', 'hydra', 'webdataset', 'wandb', 'diffusers', 'omegaconf'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "train_throughput.main(['--device', 'cpu', '--precision', 'fp32', '--preset', 'prior_tiny', '--batch', '2',"
        " '--steps', '1', '--warmup', '1', '--optim', 'foreach', '--extras', 'ema+clip'])\n"
        "assert set(sys.modules) & heavy == {'diffusers'}, heavy & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_help():
    for script in ("train_throughput.py", "sampling_speed.py"):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "--out" in result.stdout and "--device" in result.stdout


# ---------------------------------------------------------------------- sampling speed
SAMPLING_TINY = [*TINY, "--prior", "prior_tiny", "--decoder", "decoder_tiny", "--upsampler", "upsampler_tiny",
                 "--lowres-size", "16", "--num-embeds", "8", "--num-images", "4", "--num-captions", "4"]


def test_sampling_records(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    argv = [*SAMPLING_TINY, "--steps", "2", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    sampling_speed.main(argv)
    doc = json.loads(out.read_text())
    check_environment(doc, argv, "sampling_speed")
    records = doc["records"]
    rows = [r["name"] for r in records]
    assert rows == ["peer prior g=1 prior_tiny eager", "peer prior g=2 prior_tiny eager",
                    "peer decoder g=3.5 decoder_tiny eager", "path prior prior_tiny eager",
                    "path decoder decoder_tiny eager", "path upsampler upsampler_tiny eager", "path total eager"]
    for r in records[:-1]:
        assert SAMPLING_FIELDS <= set(r), SAMPLING_FIELDS - set(r)
        assert r["steps"] == 2 and len(r["runs_s"]) == 2 and r["seconds"] == statistics.median(r["runs_s"])
        assert r["seconds"] > 0 and math.isclose(r["samples_per_s"], r["samples"] / r["seconds"])
        assert r["host_syncs"] is None and r["peer_s"] is None  # CUDA-only count; the peer timed other presets
    by_name = {r["row"]: r for r in records if r["group"] == "path"} | {r["row"]: r for r in records[:3]}
    assert by_name["prior g=1"]["net_batch"] == 8 and by_name["prior g=2"]["net_batch"] == 16  # one batched forward
    assert by_name["decoder g=3.5"]["net_batch"] == 8 and by_name["decoder g=3.5"]["cond_scale"] == 3.5
    assert by_name["prior"]["candidates"] == 2 and by_name["prior"]["net_batch"] == 4 * 2
    assert by_name["upsampler"]["image_size"] == 32 and by_name["upsampler"]["lowres_size"] == 16
    total = records[-1]
    assert total["seconds"] == pytest.approx(sum(r["seconds"] for r in records[3:6]))
    assert total["samples"] == 4 and math.isclose(total["samples_per_s"], 4 / total["seconds"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("path total eager")


def test_sampling_default_work():
    """Without --steps the rows do the peer's work and each stage's own sampler (conf/model/<stage>.yaml)."""
    args = sampling_speed.parse_args(SAMPLING_TINY)
    rows = sampling_speed.plan_rows(sampling_speed.load_stages(args, torch.device("cpu")), args)
    got = {(r["group"], r["name"]): (r["sampler"].num_steps, r["sampler"].cond_scale, r["samples"]) for r in rows}
    settings = {s: train_throughput.stage_settings(s)["sampler"] for s in ("prior", "decoder", "upsampler")}
    assert got == {
        ("peer", "prior g=1"): (64, 1.0, 8), ("peer", "prior g=2"): (64, 2.0, 8),
        ("peer", "decoder g=3.5"): (64, 3.5, 4),
        ("path", "prior"): (settings["prior"]["num_steps"], settings["prior"]["cond_scale"], 4),
        ("path", "decoder"): (settings["decoder"]["num_steps"], settings["decoder"]["cond_scale"], 4),
        ("path", "upsampler"): (settings["upsampler"]["num_steps"], settings["upsampler"]["cond_scale"], 4),
    }
    assert (settings["prior"]["num_steps"], settings["decoder"]["num_steps"], settings["upsampler"]["num_steps"]) == (
        64, 50, 25)


def test_channels_last_defaults_to_the_projects_layout():
    """The benches time UNets in the layout training and the pipeline use on that device, unless told otherwise."""
    assert sampling_speed.parse_args([*SAMPLING_TINY, "--device", "cpu"]).channels_last is False
    assert sampling_speed.parse_args([*SAMPLING_TINY, "--device", "cuda"]).channels_last is True
    assert sampling_speed.parse_args([*SAMPLING_TINY, "--device", "cpu", "--channels-last"]).channels_last is True
    assert train_throughput.parse_args(["--device", "cpu"]).channels_last is False
    assert train_throughput.parse_args(["--device", "cuda"]).channels_last is True


def test_sampling_sync_split(monkeypatch):
    """Syncs per step come from the difference between the full run and a 2-step run of the same call."""

    def fake_count(fn, device):  # stands in for CUDA's sync debug mode: 1 sync per net evaluation, 3 per call
        forwards = []  # counted at the output layer: the prior's cached sampling path does not call forward()
        handle = stage.net.out.register_forward_hook(lambda *_: forwards.append(1))
        try:
            fn()
        finally:
            handle.remove()
        return len(forwards) + 3, {"here:1": len(forwards) + 3}

    monkeypatch.setattr(sampling_speed, "count_host_syncs", fake_count)
    args = sampling_speed.parse_args([*SAMPLING_TINY, "--rows", "path", "--decoder", "none", "--upsampler", "none",
                                      "--steps", "5"])
    [row] = sampling_speed.plan_rows(sampling_speed.load_stages(args, torch.device("cpu")), args)
    stage = row["stage"]
    syncs = sampling_speed.count_row_syncs(row, torch.device("cpu"), contextlib.nullcontext)
    assert syncs == {"host_syncs": 5 + 3, "host_syncs_per_step": 1.0, "host_syncs_per_call": 3.0,
                     "sync_sites": {"here:1": 8}}


@pytest.mark.slow
def test_sampling_compiled(tmp_path):
    argv = [*SAMPLING_TINY, "--rows", "path", "--upsampler", "none", "--steps", "2", "--repeats", "1",
            "--compile", "on", "--compile-backend", "aot_eager"]
    records = sampling_speed.main(argv)
    assert [r["name"] for r in records] == ["path prior prior_tiny compiled", "path decoder decoder_tiny compiled",
                                            "path total compiled"]
    assert all(r["first_run_s"] > 0 for r in records[:-1])


# ---------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
def test_sync_counter_sees_a_host_sync():
    x = torch.ones(4, device="cuda")
    count, sites = train_throughput.count_host_syncs(lambda: x.sum().item(), torch.device("cuda"))
    assert count >= 1 and sites
    count, _ = train_throughput.count_host_syncs(lambda: x * 2, torch.device("cuda"))
    assert count == 0


def test_shapes_subset_keeps_whole_samples_of_the_asked_scenes(tmp_path, capsys):
    import shapes_subset

    from unclip.data.shapes import write_shapes

    write_shapes(tmp_path / "data", num_train=60, num_val=0, num_heldout=0, shard_size=30, image_size=32,
                 num_workers=1, progress=False)
    src = str(tmp_path / "data" / "train" / "*.tar")
    shapes_subset.main(["--src", src, "--out", str(tmp_path / "sub"), "--objects", "1", "--size", "large"])
    kept_files = 0
    for shard in sorted((tmp_path / "sub").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            metas = [json.loads(tar.extractfile(n).read())["attributes"] for n in names if n.endswith(".json")]
        assert {n.split(".", 1)[0] for n in names} == {n.split(".", 1)[0] for n in names if n.endswith(".jpg")}
        assert all(len(m["objects"]) == 1 and m["objects"][0]["size"] == "large" for m in metas)
        kept_files += len(metas)
    expected = 0
    for shard in sorted((tmp_path / "data" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for n in tar.getnames():
                if n.endswith(".json"):
                    objects = json.loads(tar.extractfile(n).read())["attributes"]["objects"]
                    expected += len(objects) == 1 and objects[0]["size"] == "large"
    assert 0 < kept_files == expected < 60
    assert f"kept {expected} of 60 samples in 2 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no shards match"):
        shapes_subset.main(["--src", str(tmp_path / "none" / "*.tar"), "--out", str(tmp_path / "x")])
    # nothing is overwritten: not the source shards, not a shard of the same name from another folder
    before = {p: p.read_bytes() for p in (tmp_path / "data" / "train").glob("*.tar")}
    with pytest.raises(SystemExit, match="would overwrite them"):
        shapes_subset.main(["--src", src, "--out", str(tmp_path / "data" / "train"), "--size", "small"])
    assert {p: p.read_bytes() for p in before} == before
    shutil.copytree(tmp_path / "sub", tmp_path / "sub2")
    with pytest.raises(SystemExit, match="same name"):
        shapes_subset.main(["--src", str(tmp_path / "sub*" / "*.tar"), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):  # argparse: a size the generator does not draw
        shapes_subset.main(["--src", src, "--out", str(tmp_path / "z"), "--size", "huge"])
