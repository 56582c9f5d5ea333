"""docs/RELIABILITY.md's promises, held end to end through `python train.py` in real processes: kill -9 and
relaunch, preemption signals, atomic checkpoint writes, and bad data at full speed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unclip.checkpoint_io import AtomicCheckpointIO
from unclip.data.stream import lane_shards

from .conftest import ROOT
from .keylog import read_keylog
from .test_datamodule import encode, natural_image, write_shard

# Every run: the tiny prior on CPU, one thread per process (deterministic, and fair to a 2-core machine).
TINY = ["experiment=tiny_prior", "trainer.val_check_interval=10"]


def launch(run_dir: Path, data_dir: Path, overrides: list[str], keylog: Path | None = None, sleep_s: float = 0.0,
           env: dict | None = None, **popen) -> subprocess.Popen:
    """Start `python train.py` into `run_dir` (the way a requeued job relaunches: same command, same folder)."""
    args = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    if keylog is not None:
        args += ["+callbacks.keylog._target_=tests.keylog.KeyLog", f"+callbacks.keylog.path={keylog}",
                 f"+callbacks.keylog.sleep_s={sleep_s}"]
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "UNCLIP_DATA_DIR": str(data_dir),
                "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    log = open(run_dir.parent / f"{run_dir.name}.out", "ab")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, **popen)


def finish(proc: subprocess.Popen, run_dir: Path, returncode: int = 0, timeout: float = 300) -> None:
    """Wait for the run and check its exit status (showing its output when it is not the expected one)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        proc.kill()
    output = (run_dir.parent / f"{run_dir.name}.out").read_text(errors="replace")
    assert rc == returncode, output[-4000:]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def last_step(keylog: Path) -> int:
    return max(read_keylog(keylog)[1], default=0) if keylog.is_file() else 0


def checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------- kill -9, resume

STREAMS = {
    # 80 samples per epoch: 3 batches per worker, 6 per epoch, so step 15 is mid-epoch and mid-round-robin.
    "resampled": ["data.epoch_length=80"],
    # 256 samples in 4 shards: 8 batches per worker, 16 per epoch.
    "finite": ["data.resampled=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stream", STREAMS)
def test_kill_9_then_relaunch_continues_as_if_never_stopped(stream, tmp_path, data_dir):
    """A run killed with SIGKILL after its step-15 checkpoint, relaunched into its folder, sees the same
    batch at every step as an uninterrupted run and ends with bit-identical weights, EMA and optimizer state:
    model, optimizer, EMA, LR schedule, random streams and the data position (2 workers) all resumed."""
    overrides = [*TINY, "trainer.max_steps=24", "trainer.val_check_interval=5", "data.num_workers=2", *STREAMS[stream],
                 "callbacks.model_checkpoint.every_n_train_steps=5"]
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    reference = launch(plain, data_dir, overrides, tmp_path / "plain.keys")
    victim = launch(killed, data_dir, overrides, tmp_path / "killed.keys", sleep_s=0.15)
    # Step 17 has begun: the checkpoints of step 15 are written (the next ones come at step 20).
    wait_for(lambda: last_step(tmp_path / "killed.keys") >= 17, victim, what="step 17")
    os.kill(victim.pid, signal.SIGKILL)
    finish(victim, killed, returncode=-signal.SIGKILL)
    resumed_at = checkpoint(killed)["global_step"]  # loads: a kill never leaves a partial file
    relaunch = launch(killed, data_dir, overrides, tmp_path / "killed.keys")
    finish(relaunch, killed)
    finish(reference, plain)

    starts, steps = read_keylog(tmp_path / "killed.keys")
    assert starts == [0, 15] and resumed_at == 15
    _, reference_steps = read_keylog(tmp_path / "plain.keys")
    assert sorted(steps) == sorted(reference_steps) == list(range(1, 25))
    assert steps == reference_steps  # the same samples at every step, before and after the kill
    a, b = checkpoint(plain), checkpoint(killed)
    assert a["global_step"] == b["global_step"] == 24
    for key in ("state_dict", "current_model_state"):  # EMA weights, training weights
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_two_rank_ddp_resume_continues_each_ranks_stream(tmp_path, data_dir):
    """DDP on 2 CPU processes: the step-5 checkpoint (rank 0 writes it) holds both ranks' data positions and
    random streams; relaunched from it, the run ends with the same weights as the uninterrupted one."""
    overrides = [*TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=12", "data.epoch_length=80",
                 "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.val_check_interval=5"]
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"
    finish(launch(plain, data_dir, overrides), plain)
    step5 = checkpoint(plain, "step0000005.ckpt")
    ranks = step5["WebDataModule"]["ranks"]
    # 3 batches per rank and epoch: step 5 is the second batch of epoch 1 on each rank
    assert len(ranks) == 2 and all(r["seen"] == {"train": 80} and r["stream"]["consumed"] == [2] for r in ranks)
    rng = step5["callbacks"]["RNGState"]["ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank its own stream
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last.ckpt").write_bytes((plain / "checkpoints" / "step0000005.ckpt").read_bytes())
    finish(launch(resumed, data_dir, overrides), resumed)
    a, b = checkpoint(plain), checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 12
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


# ------------------------------------------------------------------------------------------ preemption


@pytest.mark.slow
def test_preemption_signals_checkpoint_exit_0_and_the_relaunch_continues(tmp_path, data_dir):
    """SIGUSR1 under SLURM: last.ckpt at the last trained step, exit 0, the job requeued (a stand-in
    `scontrol`); the relaunch resumes there; SIGTERM to the whole process group (workers included): the
    same without a requeue; a third launch finishes the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\n')
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run, keys = tmp_path / "run", tmp_path / "run.keys"
    overrides = [*TINY, "trainer.max_steps=1000", "data.num_workers=2"]

    first = launch(run, data_dir, overrides, keys, sleep_s=0.05, env=env)
    wait_for(lambda: last_step(keys) >= 8, first, what="8 training steps")
    first.send_signal(signal.SIGUSR1)
    finish(first, run, timeout=60)
    stopped = last_step(keys)
    assert checkpoint(run)["global_step"] == stopped
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]

    second = launch(run, data_dir, overrides, keys, sleep_s=0.05, env=env, start_new_session=True)
    wait_for(lambda: last_step(keys) >= stopped + 5, second, what="5 more steps")
    os.killpg(second.pid, signal.SIGTERM)  # as a cluster does: every process of the job
    finish(second, run, timeout=60)
    stopped_again = last_step(keys)
    assert checkpoint(run)["global_step"] == stopped_again
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]  # SIGTERM does not requeue

    third = launch(run, data_dir, [*overrides[:-2], f"trainer.max_steps={stopped_again + 3}"], keys)
    finish(third, run)
    starts, steps = read_keylog(keys)
    assert starts == [0, stopped, stopped_again] and max(steps) == stopped_again + 3
    assert checkpoint(run)["global_step"] == stopped_again + 3


# ---------------------------------------------------------------------------------- atomic checkpoints

SAVER = textwrap.dedent("""
    import pathlib, sys, torch
    from unclip.utils.atomic import atomic_torch_save  # what AtomicCheckpointIO writes local files with
    pathlib.Path(sys.argv[2]).touch()
    for step in range(10**6):
        atomic_torch_save({"step": step, "weights": torch.full((4, 1 << 20), float(step))}, sys.argv[1])
""")


def test_a_kill_during_a_save_never_leaves_a_partial_checkpoint(tmp_path):
    """kill -9 a process that writes 16 MB checkpoints back to back, at several moments (mid-write at least
    once): the file always loads (weights-only) and holds one whole save; the next save clears the dead
    writer's temporary file."""
    path, ready = tmp_path / "last.ckpt", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    mid_write = 0
    for delay in (0.3, 0.45, 0.6):
        ready.unlink(missing_ok=True)
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(ready)], env=env)
        wait_for(ready.exists, saver, what="the saver to start")
        time.sleep(delay)
        saver.kill()
        saver.wait()
        mid_write += any(tmp_path.glob(".last.ckpt.*.tmp"))
        ckpt = torch.load(path, weights_only=True)
        assert torch.equal(ckpt["weights"], torch.full((4, 1 << 20), float(ckpt["step"])))
    assert mid_write
    AtomicCheckpointIO().save_checkpoint({"step": -1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "ready"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------------------- bad data

EPOCHS, BATCH = 3, 4
# Per epoch, from the damaged shards below.
DAMAGE = {"corrupt_image": 2, "missing_caption": 2, "missing_image": 1, "empty_caption": 1, "truncated_tar": 1,
          "unreadable_shard": 1}


def damaged_shards(root: Path, clean: bool) -> tuple[str, int]:
    """Six shards over two workers; the three damaged ones (each kind of damage) placed before each worker's
    last shard of the last epoch, so every skip happens before the last batch is logged. `clean`: the same
    good samples with no damage (an empty but valid tar for the unreadable shard). Returns the pattern and
    the samples the run will train on."""
    rng = np.random.default_rng(7)
    good = lambda key: {"__key__": key, "jpg": encode(natural_image(rng)), "txt": f"caption {key}"}
    urls = [str(root / f"{i:05d}.tar") for i in range(6)]
    order = [lane_shards(urls, 0, EPOCHS - 1, 0, 1, lane, 2) for lane in (0, 1)]
    mixed, truncated, unreadable = order[0][0], order[0][1], order[1][0]
    root.mkdir()
    for url in urls:
        if url not in (mixed, truncated, unreadable):
            write_shard(Path(url), [good(f"{Path(url).stem}-{i}") for i in range(12)])
    bad = [
        {"__key__": "m1", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": "corrupt"},
        {"__key__": "m2", "jpg": encode(natural_image(rng))},  # no caption
        {"__key__": "m4", "mp4": b"\x00" * 64, "txt": "not an image"},
        {"__key__": "m6", "jpg": encode(natural_image(rng))[:300], "txt": "truncated jpeg"},
        {"__key__": "m7", "jpg": encode(natural_image(rng)), "txt": " \x00\t "},  # empty after cleaning
    ]
    write_shard(Path(mixed), [good(f"m{i}") for i in (0, 3, 8, 9, 10)] + ([] if clean else bad))
    write_shard(Path(truncated), [good(f"t{i}") for i in range(3 if clean else 6)])
    if not clean:
        with tarfile.open(truncated) as tar:
            members = tar.getmembers()
        cut = members[7].offset_data + members[7].size // 2  # inside t3's caption: t0..t2 survive
        Path(truncated).write_bytes(Path(truncated).read_bytes()[:cut])
    Path(unreadable).write_bytes(tarfile.BLOCKSIZE * 2 * b"\0" if clean else b"")  # clean: an empty archive
    good_counts = {url: 12 for url in urls} | {mixed: 5, truncated: 3, unreadable: 0}
    seen = 0  # samples in whole batches: each worker drops its last partial batch every epoch
    for epoch in range(EPOCHS):
        for lane in (0, 1):
            seen += sum(good_counts[u] for u in lane_shards(urls, 0, epoch, 0, 1, lane, 2)) // BATCH * BATCH
    return f"{root}/{{00000..00005}}.tar", seen


@pytest.mark.slow
def test_bad_data_is_skipped_counted_and_trains_at_full_rate(tmp_path, data_dir):
    """Every kind of damage through train.py: the run finishes its epochs, metrics.csv counts each reason
    exactly, and the damaged set trains as fast as the same good samples without damage (no per-error sleep:
    webdataset's warn_and_continue would add 0.5 s for each of the 24 skips)."""
    val = tmp_path / "val.tar"
    rng = np.random.default_rng(8)
    write_shard(val, [{"__key__": f"v{i}", "jpg": encode(natural_image(rng)), "txt": "a caption"} for i in range(4)])
    runs = {}
    for kind in ("damaged", "clean"):
        spec, seen = damaged_shards(tmp_path / f"{kind}-shards", clean=kind == "clean")
        overrides = [*TINY, f"data.train_shards='{spec}'", f"data.val_shards={val}", "data.prepare=null",
                     "data.resampled=false", "data.num_workers=2", f"data.batch_size={BATCH}", "data.shuffle_buffer=4",
                     "data.shards_per_segment=1", f"trainer.max_epochs={EPOCHS}", "trainer.max_steps=-1",
                     "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000"]
        runs[kind] = (tmp_path / kind, launch(tmp_path / kind, data_dir, overrides))
    stats, seconds = {}, {}
    for kind, (run_dir, proc) in runs.items():
        finish(proc, run_dir)
        with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        stats[kind] = [r for r in rows if r.get("data/samples_seen")][-1]  # the last step's counts
        seconds[kind] = float([r for r in rows if r.get("train/time")][-1]["train/time"])
    skipped = {k.removeprefix("data/skipped_"): float(v) for k, v in stats["damaged"].items() if "skipped_" in k and v}
    assert skipped == {reason: EPOCHS * n for reason, n in DAMAGE.items()}
    assert not any(v for k, v in stats["clean"].items() if "skipped_" in k)
    assert float(stats["damaged"]["data/samples_seen"]) == float(stats["clean"]["data/samples_seen"]) == seen
    assert seconds["damaged"] < 2 * seconds["clean"] + 2.0  # both runs share the machine: a loose bound


def _keys_on_rank(rank: int, store_path: str, out_path: str) -> None:
    import json

    import torch.distributed as dist
    from pytorch_lightning.trainer.states import TrainerStatus

    from unclip.utils.ranks import keys_on_every_rank

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    trainer = type("T", (), {"world_size": 2, "global_rank": rank,
                             "state": type("S", (), {"status": TrainerStatus.RUNNING})()})()
    metrics = {"shapes_indist_colour": 1.0 + rank, "shapes_objects1_colour": 0.5}
    if rank == 1:
        metrics["shapes_indist_relation"] = 0.25  # only this rank's samples stated a relation
    kept = keys_on_every_rank(trainer, metrics)
    dist.all_reduce(torch.tensor([len(kept)]))  # the ranks still agree on collectives afterwards
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(kept, f)
    dist.destroy_process_group()


def test_validation_metrics_keep_only_keys_every_rank_has(tmp_path):
    """Two ranks whose samples state different attributes: both log the same keys (a mismatch killed a CPU
    DDP decoder run at its first validation), with their own values."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_keys_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "kept")), nprocs=2, join=True)
    kept = [json.loads((tmp_path / f"kept.{r}").read_text()) for r in range(2)]
    assert kept[0] == {"shapes_indist_colour": 1.0, "shapes_objects1_colour": 0.5}
    assert kept[1] == {"shapes_indist_colour": 2.0, "shapes_objects1_colour": 0.5}


def _data_stats_on_rank(rank: int, store_path: str, out_path: str) -> None:
    import json

    import torch.distributed as dist

    from unclip.callbacks import DataStatsLogger

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    skipped = {"corrupt_image": 2} if rank == 0 else {}  # only rank 0 met a bad sample

    class DataModule:
        def skipped_counts(self, split=None):
            return dict(skipped)

        def samples_seen(self, split="train"):
            return 10 + rank

    from pytorch_lightning.trainer.states import TrainerStatus

    trainer = type("T", (), {"world_size": 2, "global_rank": rank, "global_step": 0, "datamodule": DataModule(),
                             "state": type("S", (), {"status": TrainerStatus.RUNNING})()})()
    logged = []
    module = type("M", (), {"log_dict": lambda self, metrics, **kw: logged.append((metrics, kw))})()
    for _ in range(3):
        DataStatsLogger(every_n_steps=1).on_train_batch_end(trainer, module, None, None, 0)
    dist.all_reduce(torch.tensor([1]))  # the ranks' collectives still line up
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(logged, f)
    dist.destroy_process_group()


def test_skip_counts_of_ranks_that_met_different_bad_samples_are_summed_without_breaking_ddp(tmp_path):
    """One rank skipped a corrupt image, the other nothing: both log the same global totals. Logged with one
    collective per key, the ranks' collective sequences differed and the run died."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_data_stats_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "logged")), nprocs=2, join=True)
    for rank in range(2):
        logged = json.loads((tmp_path / f"logged.{rank}").read_text())
        assert len(logged) == 3
        metrics, kw = logged[0]
        assert metrics == {"data/skipped_corrupt_image": 2.0, "data/samples_seen": 21.0}
        assert not kw.get("sync_dist")
