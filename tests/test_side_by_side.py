"""bench/side_by_side.py at its --smoke shapes: real worker subprocesses for our side, the peer's side skipped
when its virtualenv is absent (or stood in for, to check the ratios), records and summary in the JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import side_by_side  # noqa: E402

RECORD_FIELDS = {"side", "work", "params", "flops_per_sample", "flops_per_s", "samples_per_s", "rss_before_bytes",
                 "peak_rss_delta_bytes", "threads", "worker_wall_s", "round"}


def smoke(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "sbs.json"
    argv = ["--smoke", "--works", "prior_train", "prior_sample", "--threads", "1", "--tmp-dir", str(tmp_path),
            "--out", str(out), *extra]
    doc = side_by_side.main(argv)
    return doc, out


def test_smoke_without_the_peer(tmp_path, capsys):
    doc, out = smoke(tmp_path, "--peer-python", str(tmp_path / "absent" / "bin" / "python"), "--fit",
                     "--fit-max", "8")
    printed = capsys.readouterr().out
    assert "peer side skipped: no peer virtualenv" in printed
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(doc))  # the file holds what main returned
    assert written["peer_skipped"] and written["smoke"] and written["threads"] == 1
    assert written["matmul_peak_flops_per_s"] > 0  # the ceiling the table's "% matmul peak" divides by
    records = written["records"]
    assert [(r["side"], r["work"]) for r in records] == [("ours", "prior_train"), ("ours", "prior_sample")]
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert "error" not in r and r["threads"] == 1
        assert r["samples_per_s"] > 0 and r["flops_per_sample"] > 0 and r["peak_rss_delta_bytes"] >= 0
        assert math.isclose(r["flops_per_s"], r["samples_per_s"] * r["flops_per_sample"], rel_tol=1e-6)
    train, sample = records
    assert train["batch"] == 4 and len(train["step_s"]) == 1
    assert math.isclose(train["samples_per_s"], 4 / train["mean_step_s"])
    # 2 steps of guided DDIM: one stacked [cond; uncond] forward per step, 2 x 2 rows each
    assert sample["net_calls"] == 2 and sample["net_rows"] == 2 * 2 * 2
    assert sample["samples"] == 2 and sample["steps"] == 2
    fit = written["fits"]["prior_train"]["ours"]
    assert fit["largest_batch"] in (4, 8) and fit["tried"][0]["batch"] == 4 and fit["cap_bytes"] == 2 * 2**30
    summary = {s["work"]: s for s in written["summary"]}
    assert summary["prior_train"]["peer"] is None and summary["prior_train"]["ratio"] is None
    assert summary["prior_train"]["ours"]["largest_batch"] == fit["largest_batch"]
    assert "not measured" in printed.splitlines()[-1] or "not measured" in printed  # the peer's rows


def test_ratios_with_a_stand_in_peer(tmp_path, monkeypatch):
    """The driver's interleaving and ratios, with the peer's worker replaced by a record at half our speed."""
    real = side_by_side.run_worker
    order = []

    def run_worker(side, work, args, fit_batch=None):
        if work == "matmul_peak":
            return real(side, work, args, fit_batch)
        order.append(side)
        if side == "ours":
            return real(side, work, args, fit_batch)
        ours = next(r for r in reversed(fake_records) if r["work"] == work)
        return {**ours, "side": "peer", "samples_per_s": ours["samples_per_s"] / 2, "params": ours["params"] * 1.02,
                "flops_per_sample": ours["flops_per_sample"] * 0.98, "peak_rss_delta_bytes": 2 * 2**20 + 1}

    fake_records: list[dict] = []
    monkeypatch.setattr(side_by_side, "peer_available", lambda python: None)
    monkeypatch.setattr(side_by_side, "run_worker",
                        lambda *a, **k: fake_records.append(run_worker(*a, **k)) or fake_records[-1])
    doc, out = smoke(tmp_path, "--works", "prior_train", "--rounds", "2")
    assert order == ["ours", "peer", "ours", "peer"]  # interleaved
    (summary,) = json.loads(out.read_text())["summary"]
    assert summary["ours"]["rounds"] == summary["peer"]["rounds"] == 2
    assert math.isclose(summary["ratio"], 2.0, rel_tol=0.3)  # medians of each side's rounds
    assert math.isclose(summary["params_ratio"], 1 / 1.02) and math.isclose(summary["flops_ratio"], 1 / 0.98)
    assert summary["memory_ratio"] is not None


def test_setup_peer_fails_fast_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(side_by_side.subprocess, "run", lambda cmd, **kw: type("R", (), {"returncode": 1})())
    with pytest.raises(SystemExit, match="peer setup failed at"):
        side_by_side.main(["--setup-peer", "--peer-python", str(tmp_path / "venv" / "bin" / "python")])


def test_shapes_are_matched_by_construction():
    """Widths, depths, heads and resolutions agree between the two sides of each net."""
    prior, decoder = side_by_side.SHAPES["prior"], side_by_side.SHAPES["decoder"]
    assert prior["ours"]["width"] == prior["peer"]["dim"] and prior["ours"]["depth"] == prior["peer"]["depth"]
    assert prior["ours"]["heads"] == prior["peer"]["heads"]
    assert prior["ours"]["num_text_tokens"] == prior["peer"]["max_text_len"] == prior["text_tokens"]
    assert decoder["ours"]["model_channels"] == decoder["peer"]["dim"]
    assert decoder["ours"]["num_res_blocks"] == decoder["peer"]["num_resnet_blocks"]
    assert decoder["ours"]["image_embed_dim"] == decoder["peer"]["image_embed_dim"]


PEER = side_by_side.DEFAULT_PEER_VENV / "bin" / "python"


@pytest.mark.skipif(side_by_side.peer_available(PEER) is not None,
                    reason=f"peer side needs its virtualenv: python bench/side_by_side.py --setup-peer ({PEER})")
def test_smoke_with_the_peer(tmp_path):
    doc, _ = smoke(tmp_path, "--works", "prior_train")
    (summary,) = doc["summary"]
    assert summary["peer"] is not None and summary["ratio"] > 0
    assert [r["side"] for r in doc["records"]] == ["ours", "peer"] and all("error" not in r for r in doc["records"])
