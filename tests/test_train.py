"""train.py: every tiny experiment trains and writes a self-describing checkpoint; resume; sweeps; overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from unclip.checkpoint import STAGES, build_net, export_safetensors, load_stage_checkpoint, net_state_dict

from .conftest import ROOT, train_stage


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_experiment_writes_a_checkpoint_into_the_run_dir(stage, tiny_checkpoints):
    path = tiny_checkpoints[stage]
    assert path.is_file() and path.parent.name == "checkpoints" and path.name == "last.ckpt"
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert raw["global_step"] == 10
    ckpt = load_stage_checkpoint(path, expected_stage=stage)
    meta = ckpt["unclip"]
    assert meta["stage"] == stage and meta["version"]
    if stage == "clip":
        assert meta["clip"]["architecture"]["embed_dim"] == 32
        return
    net = build_net(meta["net"])
    net.load_state_dict(net_state_dict(ckpt["state_dict"]), strict=True)
    assert meta["diffusion"]["num_train_timesteps"] == 1000
    if stage != "upsampler":
        assert meta["clip"]["embed_dim"] == 32 and len(meta["clip"]["weights_sha256"]) == 64
        assert not any(k.startswith("clip") for k in ckpt["state_dict"])  # the frozen CLIP is not saved


def test_wrong_stage_and_foreign_files_fail_with_a_message(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="is a 'prior' checkpoint, but a 'decoder' checkpoint is expected"):
        load_stage_checkpoint(tiny_checkpoints["prior"], expected_stage="decoder")
    junk = tmp_path / "junk.ckpt"
    torch.save({"state_dict": {}}, junk)
    with pytest.raises(ValueError, match="not an unclip stage checkpoint"):
        load_stage_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        load_stage_checkpoint(tmp_path / "missing.ckpt")


def test_safetensors_export_keeps_weights_and_metadata(tiny_checkpoints, tmp_path):
    out = export_safetensors(tiny_checkpoints["decoder"], tmp_path / "decoder.safetensors")
    a = load_stage_checkpoint(tiny_checkpoints["decoder"], "decoder")
    b = load_stage_checkpoint(out, "decoder")
    assert b["unclip"] == a["unclip"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_resume_restores_step_optimizer_and_ema(tmp_path, data_dir):
    first = train_stage("tiny_prior", tmp_path / "run", data_dir, ["trainer.max_steps=6"])
    ckpt = torch.load(first["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and "current_model_state" in ckpt  # EMA and training weights both kept
    ema, live = net_state_dict(ckpt["state_dict"]), net_state_dict(ckpt["current_model_state"])
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # the final save keeps the training weights too
    second = train_stage("tiny_prior", tmp_path / "run2", data_dir,
                         ["trainer.max_steps=12", f"ckpt_path={first['checkpoint']}"])
    assert second["global_step"] == 12
    resumed = torch.load(second["checkpoint"], map_location="cpu", weights_only=True)
    state = resumed["optimizer_states"][0]["state"]
    assert int(next(iter(state.values()))["step"]) == 12  # AdamW continued its own step count


def test_bad_overrides_fail_before_training(compose_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["experiment=tiny_prior", "model/net=no_such_preset"], tmp_path)
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_cfg("train", ["experiment=tiny_prior", "model.no_such_key=1"], tmp_path)
    from unclip.train import train

    cfg = compose_cfg("train", ["experiment=tiny_prior", "model.cond_drop_prob=1.5"], tmp_path)
    with pytest.raises(InstantiationException, match="cond_drop_prob must be in"):
        train(cfg)


def test_multirun_sweep_of_a_tiny_config(tmp_path, data_dir):
    env = {**os.environ, "UNCLIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=tiny_prior", "trainer.max_steps=4",
         "model.cond_drop_prob=0.1,0.3", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    probs = {load_stage_checkpoint(sweep / j / "checkpoints" / "last.ckpt")["unclip"]["system"]["cond_drop_prob"]
             for j in ("0", "1")}
    assert probs == {0.1, 0.3}


def test_slurm_launcher_config_composes(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=tiny_prior", "hydra/launcher=slurm", "trainer.devices=8",
                                "trainer.num_nodes=2"], tmp_path)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_.lower()
    assert launcher.tasks_per_node == 8 and launcher.nodes == 2 and launcher.gpus_per_node == 8


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(tmp_path, data_dir):
    """`trainer.devices=N` just works: two CPU processes, CLIP's loss over features gathered from both."""
    env = {**os.environ, "UNCLIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=tiny_clip", "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.max_steps=6", "trainer.val_check_interval=6", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["unclip"]["stage"] == "clip"
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/t2i_r1" in metrics and "train/loss" in metrics


def test_time_budget_plan_stays_within_the_step_bounds():
    from unclip.callbacks import FitTimeBudget

    assert FitTimeBudget.plan(100, steps_per_s=10.0, remaining_s=60.0, max_steps=10_000, reserve_s=10.0) == 600
    assert FitTimeBudget.plan(100, 10.0, 60.0, max_steps=300) == 300  # max_steps stays the upper bound
    assert FitTimeBudget.plan(100, 10.0, 60.0, max_steps=-1) == 700
    assert FitTimeBudget.plan(100, 10.0, remaining_s=2.0, max_steps=-1, reserve_s=5.0) == 101  # never before now
    assert FitTimeBudget.plan(300, 10.0, 60.0, max_steps=300) == 300  # at max_steps already: it ends there


class FakeClock:
    """A monotonic clock that advances a fixed time per training step (TickClock), for timing-free tests."""

    now = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


class TickClock(pl.Callback):
    def on_train_batch_end(self, *args, **kwargs) -> None:
        FakeClock.now += 0.125


def test_a_time_budget_ends_the_run_and_its_lr_schedule_together(tmp_path, data_dir, monkeypatch):
    """With max_time and a far larger max_steps, the run stops at the planned step (before the Timer would)
    after a last validation, with the LR decayed to its floor, and the plan is in the checkpoint's scheduler
    state (so a resume keeps it). The clock runs 1/8 s per step: the 16 s budget holds 128 steps, less the 3%
    reserve (3.84 steps)."""
    import pytorch_lightning.callbacks.timer

    import unclip.callbacks
    from unclip.systems.base import WarmupCosine

    FakeClock.now = 0.0
    monkeypatch.setattr(unclip.callbacks, "time", FakeClock)
    monkeypatch.setattr(pytorch_lightning.callbacks.timer, "time", FakeClock)
    result = train_stage("tiny_prior", tmp_path / "run", data_dir, [
        "trainer.max_steps=1000000", "+trainer.max_time=00:00:00:16", "trainer.val_check_interval=1000000",
        "callbacks.time_budget.skip_steps=2", "callbacks.time_budget.estimate_at=8",
        "callbacks.model_checkpoint.every_n_train_steps=1000000",
        "+callbacks.clock._target_=tests.test_train.TickClock"])
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    step = ckpt["global_step"]
    schedule = ckpt["lr_schedulers"][0]["lr_lambdas"][0]
    assert step == schedule["total_steps"] and 124 <= step <= 125
    final = WarmupCosine(schedule["warmup_steps"], step, schedule["decay"], schedule["min_ratio"])(step - 1)
    assert final == pytest.approx(schedule["min_ratio"], abs=0.01)  # the decay has run its course
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last_val = [r.split(",") for r in rows[1:] if r.split(",")[header.index("val/loss")]]
    assert last_val and int(last_val[-1][header.index("step")]) == step - 1  # validated at the end (0-based)


def test_a_max_steps_run_validates_at_its_last_step(tmp_path, data_dir):
    """Lightning ends a max_steps run without validating; the time-budget callback asks for the last
    validation, so the curves and final figures are those of the final weights (val_check_interval=4, 6 steps:
    validations after steps 4 and 6, logged 0-based)."""
    train_stage("tiny_prior", tmp_path / "run", data_dir, ["trainer.max_steps=6", "trainer.val_check_interval=4"])
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("val/loss")]]
    assert val_steps == [3, 5]


@pytest.mark.parametrize("experiment", ["tiny_prior", "tiny_clip"])
def test_compiled_training_step_with_eager_validation(experiment, tmp_path, data_dir):
    """model.compile=<backend> compiles only the training forward: validation (eval mode, no grad, its own
    batch size) adds no graph, and the checkpoint holds the plain net's keys."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train_stage(experiment, tmp_path / "run", data_dir, [
        "trainer.max_steps=4", "trainer.val_check_interval=2", "model.compile=aot_eager",
        "callbacks.model_checkpoint.every_n_train_steps=4"])
    # One graph: the training forward's. Validation's modes and batch sizes would each have added one.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k or "_train_" in k for k in ckpt["state_dict"])
    torch._dynamo.reset()
