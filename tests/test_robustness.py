"""A hostile user: bad checkpoint files, bad prompts, bad overrides, diverging runs, moved run folders. Each
test fails on the behaviour it guards against (raw library errors, code run from a pickle, silent garbage)."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from unclip.checkpoint import (
    CheckpointError,
    check_resume_checkpoint,
    export_safetensors,
    load_stage_checkpoint,
)

from .conftest import ROOT, train_stage

TORCH_ADVICE = "weights_only=False"  # torch's hint for a refused pickle; following it would run the code


class RunsCode:
    """Pickles to a call that leaves a marker file: proof of execution if it is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(root: Path, good: Path) -> dict[str, Path]:
    """One file of each kind a stage checkpoint must not be: name -> path (the marker is root/RAN)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "RAN"
    files = {name: root / f"{name}.ckpt" for name in ("empty", "truncated", "random", "code", "pickle",
                                                       "safetensors", "list")}
    files["empty"].write_bytes(b"")
    raw = good.read_bytes()
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["random"].write_bytes(os.urandom(4096))
    torch.save({"state_dict": {}, "unclip": RunsCode(marker)}, files["code"])
    files["pickle"].write_bytes(pickle.dumps(RunsCode(marker)))
    shutil.copy(export_safetensors(good, root / "export.safetensors"), files["safetensors"])
    torch.save([1, 2, 3], files["list"])
    files["directory"] = root / "a_directory.ckpt"
    files["directory"].mkdir(exist_ok=True)
    return files


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and TORCH_ADVICE not in message, message
    return message


def subprocess_env(data_dir: Path) -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "UNCLIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def run_script(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(data_dir), capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------- bad checkpoint files
def test_bad_stage_files_are_refused_in_one_line_naming_them(tiny_checkpoints, tmp_path):
    files = bad_files(tmp_path / "bad", tiny_checkpoints["decoder"])
    files.pop("safetensors")  # read by its content: a stage file whatever its name
    for name, path in files.items():
        with pytest.raises(CheckpointError) as info:
            load_stage_checkpoint(path, expected_stage="decoder")
        message = one_line(info.value)
        assert str(path) in message and "expected a 'decoder' checkpoint" in message, (name, message)
    assert "empty (0 bytes)" in str(pytest.raises(CheckpointError, load_stage_checkpoint, files["empty"]).value)
    wrong = pytest.raises(CheckpointError, load_stage_checkpoint, tiny_checkpoints["prior"], "decoder").value
    assert "is a 'prior' checkpoint, but a 'decoder' checkpoint is expected" in one_line(wrong)
    assert not (tmp_path / "bad" / "RAN").exists()  # nothing in any file was run
    assert load_stage_checkpoint(tmp_path / "bad" / "safetensors.ckpt", "decoder")["unclip"]["stage"] == "decoder"


def test_a_diverged_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    ckpt = torch.load(tiny_checkpoints["decoder"], map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("net."))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=f"non-finite weights .* e.g. {name}"):
        load_stage_checkpoint(tmp_path / "nan.ckpt", "decoder")


def test_resume_files_are_checked_before_lightning_reads_them(tiny_checkpoints, compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=tiny_decoder"], tmp_path / "run")
    model = instantiate(cfg.model)
    check_resume_checkpoint(tiny_checkpoints["decoder"], model)  # the real thing passes
    for name, path in bad_files(tmp_path / "bad", tiny_checkpoints["decoder"]).items():
        with pytest.raises((CheckpointError, FileNotFoundError)) as info:
            check_resume_checkpoint(path, model)
        assert str(path) in one_line(info.value), name
    wrong = pytest.raises(CheckpointError, check_resume_checkpoint, tiny_checkpoints["prior"], model).value
    assert "is a 'prior' checkpoint, but this run trains the 'decoder' stage" in one_line(wrong)
    wider = instantiate(compose_cfg("train", ["experiment=tiny_decoder", "model.net.model_channels=16"],
                                    tmp_path / "wider").model)
    shapes = pytest.raises(CheckpointError, check_resume_checkpoint, tiny_checkpoints["decoder"], wider).value
    assert "does not fit this run's decoder model" in one_line(shapes) and "of another shape" in str(shapes)
    other_clip = instantiate(compose_cfg("train", ["experiment=tiny_decoder", "clip.init_seed=7"],
                                         tmp_path / "clip").model)
    clip = pytest.raises(CheckpointError, check_resume_checkpoint, tiny_checkpoints["decoder"], other_clip).value
    assert "trained with another CLIP (weights_sha256=" in one_line(clip)
    assert not (tmp_path / "bad" / "RAN").exists()


@pytest.mark.parametrize("script", ["train.py ckpt_path", "train.py clip.checkpoint", "sample.py pipeline.decoder",
                                    "evaluate.py ckpt"])
def test_entry_points_refuse_a_pickle_that_runs_code(script, tmp_path, data_dir):
    """A real process per entry point: the file is named, nothing in it runs, no checkpoint is left behind."""
    marker = tmp_path / "RAN"
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": RunsCode(marker), "unclip": {"stage": "decoder"}}, evil)
    name, key = script.split()
    args = [name, f"{key}={evil}", f"hydra.run.dir={tmp_path / 'run'}"]
    args += {"train.py": ["experiment=tiny_decoder", "trainer.max_steps=2"], "sample.py": ["prompt=a red circle"],
             "evaluate.py": ["data=shapes_tiny", "num_samples=4"]}[name]
    proc = run_script(args, data_dir)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if str(evil) in line and "holds objects other than" in line]
    assert lines, proc.stderr[-2000:]
    assert TORCH_ADVICE not in proc.stderr + proc.stdout
    assert not marker.exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no step-0 on_exception.ckpt posing as a model


def test_failing_before_the_first_step_leaves_no_checkpoint(tmp_path, data_dir):
    """ExceptionCheckpoint writes only after progress: shards that match nothing fail at setup, naming the
    pattern, and no on_exception.ckpt (an untrained model sample.py would accept) is written."""
    with pytest.raises(ValueError, match="nothing-here"):
        train_stage("tiny_prior", tmp_path / "run", data_dir, [f"data.train_shards={tmp_path}/nothing-here/*.tar"])
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# ------------------------------------------------------------------------------- relaunch and resume
def test_a_relaunch_from_a_moved_run_folder_continues_last_ckpt(tmp_path, data_dir):
    every2 = ["callbacks.model_checkpoint.every_n_train_steps=2"]
    train_stage("tiny_prior", tmp_path / "first", data_dir, ["trainer.max_steps=4", *every2])
    shutil.move(tmp_path / "first", tmp_path / "moved")
    result = train_stage("tiny_prior", tmp_path / "moved", data_dir, ["trainer.max_steps=8", *every2])
    ckpts = tmp_path / "moved" / "checkpoints"
    assert not list(ckpts.glob("last-v*.ckpt"))
    assert Path(result["checkpoint"]) == ckpts / "last.ckpt" and result["global_step"] == 8
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8


def test_a_corrupt_last_ckpt_falls_back_to_the_newest_good_checkpoint(tmp_path, data_dir):
    every2 = ["callbacks.model_checkpoint.every_n_train_steps=2"]
    run = tmp_path / "run"
    train_stage("tiny_prior", run, data_dir, ["trainer.max_steps=4", *every2])
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. the node died mid-write
    (run / "checkpoints" / "step0000002.ckpt").write_bytes(b"")  # an older one is broken too
    result = train_stage("tiny_prior", run, data_dir, ["trainer.max_steps=6", *every2])
    resumed = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6
    assert int(next(iter(resumed["optimizer_states"][0]["state"].values()))["step"]) == 6  # continued from 4
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="holds checkpoints but none can resume this run"):
        train_stage("tiny_prior", run, data_dir, ["trainer.max_steps=8"])


def test_resume_restores_the_ema_average_built_at_fit_start(tmp_path, data_dir):
    first = train_stage("tiny_prior", tmp_path / "run", data_dir, ["trainer.max_steps=6"])
    again = train_stage("tiny_prior", tmp_path / "run2", data_dir,
                        ["trainer.max_steps=6", f"ckpt_path={first['checkpoint']}"])  # nothing left to train
    a = torch.load(first["checkpoint"], map_location="cpu", weights_only=True)
    b = torch.load(again["checkpoint"], map_location="cpu", weights_only=True)
    assert b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # the average
    assert torch.equal(a["averaging_state"]["n_averaged"], b["averaging_state"]["n_averaged"])
    assert any(not torch.equal(b["state_dict"][k], b["current_model_state"][k]) for k in b["state_dict"])


def test_ema_copy_lives_on_the_module_device():
    """Built at fit start, after the strategy moved the module (here to the meta device), not in setup."""
    from unclip.callbacks import EMA

    module = pl.LightningModule()
    module.layer = torch.nn.Linear(4, 4)
    ema = EMA(decay=0.9)
    ema.setup(None, module, "fit")
    module.to("meta")
    ema.on_fit_start(None, module)
    assert {p.device.type for p in ema._average_model.parameters()} == {"meta"} == {module.device.type}


def test_ema_copies_counters_instead_of_averaging_them():
    from unclip.callbacks import _EMAModel

    module = torch.nn.Linear(2, 2)
    module.register_buffer("nonfinite_steps", torch.zeros(()))
    ema = _EMAModel(module, decay=0.9, warmup=False)
    for _ in range(5):
        with torch.no_grad():
            module.weight.add_(1.0)
        module.nonfinite_steps += 1
        ema.update_parameters(module)
    assert float(ema.module.nonfinite_steps) == 5.0
    assert not torch.equal(ema.module.weight, module.weight)  # weights are averaged


# ------------------------------------------------------------------------------- divergence
class BlowUpAt(pl.Callback):
    """Sets the learning rate to inf after optimizer step `step` (a run that diverges mid-way)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for config in trainer.lr_scheduler_configs:
                config.scheduler.base_lrs = [float("inf")] * len(config.scheduler.base_lrs)
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = float("inf")


def test_lr_inf_stops_the_run_with_a_message(tmp_path, data_dir):
    proc = run_script(["train.py", "experiment=tiny_prior", "model.optimizer.lr=inf", "trainer.max_steps=40",
                       "callbacks.divergence.max_nonfinite_streak=5", f"hydra.run.dir={tmp_path}"], data_dir)
    assert proc.returncode != 0
    assert "training diverged" in proc.stderr and "lower model.optimizer.lr" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))  # no checkpoint of garbage weights, no on_exception.ckpt


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, data_dir):
    from unclip.callbacks import TrainingDiverged

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is .*last.ckpt"):
        train_stage("tiny_prior", run, data_dir, [
            "trainer.max_steps=20", "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.divergence.check_every_n_steps=3", "callbacks.divergence.max_nonfinite_streak=2",
            "+callbacks.blowup._target_=tests.test_robustness.BlowUpAt", "+callbacks.blowup.step=4"])
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    load_stage_checkpoint(last, "prior")  # finite: usable by sample.py / a resume
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()


def test_the_divergence_check_reads_the_device_counter_only_at_intervals():
    from unclip.callbacks import StopOnDivergence, TrainingDiverged

    class Counter:
        reads = 0

        def __int__(self) -> int:
            Counter.reads += 1
            return 7

    class Trainer:
        global_step = 0
        checkpoint_callback = None

    module, trainer = type("M", (), {"nonfinite_streak": Counter()})(), Trainer()
    stop = StopOnDivergence(max_nonfinite_streak=8, check_every_n_steps=5)
    for step in range(1, 11):
        trainer.global_step = step
        stop.on_train_batch_end(trainer, module, None, None, step)
    assert Counter.reads == 2
    stop.max_nonfinite_streak = 7
    trainer.global_step = 15
    with pytest.raises(TrainingDiverged, match="the last 7 steps"):
        stop.on_train_batch_end(trainer, module, None, None, 15)


def test_retrieval_recall_of_degenerate_embeddings_is_not_perfect():
    from unclip.eval.retrieval import grouped_recall

    captions = [f"caption {i}" for i in range(10)]
    good = torch.nn.functional.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert grouped_recall(good, good, captions) == {1: 1.0, 5: 1.0}
    for bad in (torch.full((10, 8), float("nan")), torch.zeros(10, 8)):  # every key ties: no hit
        assert grouped_recall(bad, good, captions) == {1: 0.0, 5: 0.0}, bad[0]
    assert grouped_recall(torch.ones(10, 8), good, captions)[1] <= 0.1  # one query can be right by chance
    half = good.clone()
    half[:5] = float("nan")
    assert grouped_recall(half, good, captions)[1] == 0.5


# ------------------------------------------------------------------------------- bad overrides
@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_steps=abc", "trainer.max_steps='abc': pytorch_lightning.Trainer takes an integer"),
    ("model.optimizer.lr=abc", "model.optimizer.lr='abc': torch.optim.AdamW takes a number"),
    ("data.batch_size=abc", "data.batch_size='abc': unclip.data.datamodule.WebDataModule takes an integer"),
    ("data.batch_size=1.5", "data.batch_size=1.5"),
    ("model.cond_drop_prob=[1]", "model.cond_drop_prob=\\[1\\]"),
    ("data=webdataset", "data.train_shards is required: pass data.train_shards="),
])
def test_wrong_types_and_missing_keys_fail_before_training(override, message, compose_cfg, tmp_path):
    from unclip.train import train

    cfg = compose_cfg("train", ["experiment=tiny_prior", override], tmp_path)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()


def test_documented_brace_patterns_reach_hydra(compose_cfg, tmp_path):
    """Every shard override with a brace pattern in the README, docs and config comments, split as a shell
    splits it, parses as a Hydra override and yields the pattern."""
    import re
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "conf").rglob("*.yaml")]
    args = []
    for path in texts:
        for line in path.read_text().splitlines():
            line = line.lstrip("# ")
            if re.match(r"python (train|sample|evaluate)\.py|python -m unclip", line) and "{" in line:
                args += [a for a in shlex.split(line.split("  #")[0].rstrip("\\ ")) if "shards=" in a and "{" in a]
    assert len(args) >= 8
    parser = OverridesParser.create()
    for arg in args:
        override = parser.parse_override(arg)
        value = override.value()
        assert isinstance(value, str) and "{" in value and ".." in value, arg
    cfg = compose_cfg("train", ["data=webdataset", args[0]], tmp_path)
    assert cfg.data.train_shards == parser.parse_override(args[0]).value()


# ------------------------------------------------------------------------------- bad prompts and paths
def test_prompt_file_errors_name_the_file_before_anything_loads(compose_cfg, tmp_path):
    from unclip.sample import sample

    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"a red circle\n\xff\xfe\x00\x81 binary")
    missing_ckpt = ["pipeline.decoder=/nonexistent/decoder.ckpt"]  # never reached: prompts are read first
    for prompts_file, message in [(binary, f"prompts_file={binary} is not UTF-8 text"),
                                  (tmp_path, f"prompts_file={tmp_path} is a directory")]:
        cfg = compose_cfg("sample", [*missing_ckpt, f"prompts_file={prompts_file}"], tmp_path / "run")
        with pytest.raises(ValueError, match=message):
            sample(cfg)
    cfg = compose_cfg("sample", [*missing_ckpt, "prompt=x", "max_filename_chars=1000"], tmp_path / "run")
    with pytest.raises(ValueError, match="max_filename_chars=1000: pass an integer from 1 to 200"):
        sample(cfg)


def test_hostile_prompts_become_safe_names_inside_the_run_folder(tiny_checkpoints, compose_cfg, tmp_path):
    from unclip.sample import sample

    prompts = ["../../../etc/passwd", "/abs/path", "C:\\Windows\\x", "\x00\x1b[31mred\x7f", "☃ 图像 ümlaut",
               "..", "x" * 10_000, "a" * 250 + "/" + "b" * 250]
    cfg = compose_cfg("sample", [
        f"pipeline.prior={tiny_checkpoints['prior']}", f"pipeline.decoder={tiny_checkpoints['decoder']}",
        "prior_sampler.num_steps=2", "decoder_sampler.num_steps=2", "max_filename_chars=200",
    ], tmp_path / "run")
    cfg.prompts = prompts
    result = sample(cfg)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    images = (tmp_path / "run" / "images").resolve()
    assert len(result["files"]) == len(prompts)
    assert all(p.resolve().is_relative_to((tmp_path / "run").resolve()) for p in written)
    for path in map(Path, result["files"]):
        assert path.resolve().parent == images and len(path.name.encode()) <= 255
        assert path.name.isascii() and not any(ord(c) < 32 for c in path.name)


# ------------------------------------------------------------------------------- CLIP widths and probes
def test_prior_and_decoder_take_their_widths_from_the_clip(compose_cfg, tmp_path):
    """A CLIP of other widths than the preset names (as clip=vit_b32 with a shapes preset) just works."""
    other = ["clip.architecture.embed_dim=48", "clip.architecture.text_cfg.width=40",
             "clip.architecture.text_cfg.context_length=24"]
    prior = instantiate(compose_cfg("train", ["experiment=tiny_prior", *other], tmp_path).model)
    assert (prior.net.config["embed_dim"], prior.net.config["text_token_dim"],
            prior.net.config["num_text_tokens"]) == (48, 40, 24)
    decoder = instantiate(compose_cfg("train", ["experiment=tiny_decoder", *other], tmp_path).model)
    assert (decoder.net.config["image_embed_dim"], decoder.net.config["text_token_dim"]) == (48, 40)
    with pytest.raises(Exception, match="prior embed_dim=64 but the CLIP encoder embeds to 48"):
        instantiate(compose_cfg("train", ["experiment=tiny_prior", *other, "model.net.embed_dim=64"], tmp_path).model)


def test_the_pretrained_probe_is_bounded_where_https_hangs(monkeypatch):
    """DNS and TCP work but HTTPS never answers (a blocking proxy or firewall): unreachable within the bound,
    so a pretrained tag fails fast instead of open_clip retrying for most of a minute."""
    from unclip.clip import encoder

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever answers
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout=None, *a, **k: real(silent.getsockname(), timeout))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        start = time.monotonic()
        reachable, why = encoder._host_reachable("https://huggingface.co/laion/x", timeout_s=0.5)
        assert not reachable and time.monotonic() - start < 2.0, why
        monkeypatch.setattr(encoder, "_pretrained_source", lambda *a: ("https://huggingface.co/laion/x", False))
        start = time.monotonic()
        with pytest.raises(encoder.PretrainedUnavailableError, match="cannot be reached"):
            encoder.ClipEncoder(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k", connect_timeout_s=0.5)
        assert time.monotonic() - start < 10.0
    finally:
        silent.close()


# ------------------------------------------------------------------------------- metrics and exports
def test_validation_skips_are_metrics(tmp_path, data_dir):
    import webdataset as wds

    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": "a red circle"})
    val = f"{data_dir}/shapes_tiny/val/*.tar"  # read after bad.tar: validation reads one batch here
    train_stage("tiny_prior", tmp_path / "run", data_dir, ["trainer.max_steps=4", "trainer.val_check_interval=4",
                                                          f"data.val_shards=['{bad}','{val}']"])
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "data/val_skipped" in header and "data/val_skipped_corrupt_image" in header
    column = header.index("data/val_skipped_corrupt_image")
    assert [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]] == [1.0]


def test_exported_safetensors_get_the_usual_file_mode(tiny_checkpoints, tmp_path):
    out = export_safetensors(tiny_checkpoints["prior"], tmp_path / "prior.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
