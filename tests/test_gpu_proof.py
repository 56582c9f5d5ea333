"""bench/gpu_proof.py and the demo options it drives: commands, time shares, and parts killed at their limit."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import gpu_proof as proof  # noqa: E402

import demo  # noqa: E402


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"smoke": False, "eval_samples": 600, "device": "cpu", **kw})


def test_demo_budgets_scale_and_benchmarks_stop_starting_before_their_end(tmp_path):
    cmd = proof.part_command("demo", args(), tmp_path, 0.6, 300)
    assert cmd[1:4] == ["demo.py", "--preset", "shapes"] and "--train-override=model.compile=false" in cmd
    assert "--budget=clip=00:00:00:45" in cmd and "--budget=decoder=00:00:01:12" in cmd  # 75 s and 120 s x 0.6
    train = proof.part_command("train", args(), tmp_path, 1.0, 150)
    assert train[train.index("--budget-s") + 1] == "90"  # 150 s less the 60 s a compiled configuration needs
    assert proof.part_command("sampling", args(), tmp_path, 1.0, 10)[-3:-2] == ["1"]  # never below 1 s
    assert proof.hms(75) == "00:00:01:15" and proof.hms(3) == "00:00:00:10"
    smoke = proof.part_command("profile", args(smoke=True), tmp_path, 1.0, 100)
    assert "model.num_val_samples=2" in smoke and not any(o.startswith("decoder:") for o in smoke)


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '30']); "
              f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(30)")
    start = time.monotonic()
    result = proof.run_part("slow", [sys.executable, "-c", script], 2.0, tmp_path)
    assert result["rc"] == "timeout" and time.monotonic() - start < 10
    stat = Path(f"/proc/{int(marker.read_text())}/stat")
    time.sleep(0.2)  # the grandchild went with the part's process group (gone, or a zombie awaiting its reaper)
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"
    assert (tmp_path / "slow.log").exists()


def test_demo_train_overrides_scope_to_a_stage_and_budgets_are_checked():
    items = ["trainer.accelerator=cpu", "decoder:model.num_val_samples=2", "prior:model.sampler.num_steps=2",
             "+trainer.max_time=00:00:01:00"]
    assert demo.stage_overrides(items, "decoder") == ["trainer.accelerator=cpu", "model.num_val_samples=2",
                                                      "+trainer.max_time=00:00:01:00"]
    assert demo.stage_overrides(items, "clip") == ["trainer.accelerator=cpu", "+trainer.max_time=00:00:01:00"]
    parser = argparse.ArgumentParser()
    assert demo.parse_budgets(parser, ["clip=00:00:01:30"]) == {"clip": "00:00:01:30"}
    for bad in ("clip=90", "vae=00:00:01:30", "clip"):
        with pytest.raises(SystemExit):
            demo.parse_budgets(parser, [bad])


def test_demo_bars_say_which_are_met_by_how_much_and_for_which_kind_of_scene():
    metrics = {"shapes_indist_colour": 0.772, "shapes_objects1_colour": 0.965, "shapes_objects2_colour": 0.594,
               "shapes_indist_relation": 0.85, "shapes_objects2_relation": 0.85}
    bars = {"shapes_indist_colour": 0.95, "shapes_indist_relation": 0.80, "shapes_heldout_all": 0.30}
    colour, relation, missing = demo.check_bars(metrics, bars)
    assert colour == {"key": "shapes_indist_colour", "value": 0.772, "bar": 0.95, "met": False,
                      "objects1": 0.965, "objects2": 0.594}
    assert relation["met"] and relation["objects1"] is None and relation["objects2"] == 0.85
    assert not missing["met"] and missing["value"] is None
    lines = demo.format_bars([colour, relation, missing])
    assert "short 0.178" in lines[1] and "0.965" in lines[1] and "0.594" in lines[1]
    assert " met " in lines[2] and "missing" in lines[3]
    assert set(demo.BARS) == set(demo.PRESETS)  # every preset is held to bars
