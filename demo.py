"""The whole unCLIP pipeline on the embedded `shapes` data: train CLIP -> prior -> decoder -> upsampler, sample
a grid for a few captions, evaluate, and print where everything is.

    python demo.py                   the CPU demo (32 px -> 128 px; about 10 minutes on 2 cores)
    python demo.py --preset shapes   the GPU run (64 px -> 256 px; one H100, under 10 minutes; docs/RESULTS.md)
    python demo.py --fast            a few steps per stage (the test suite's end-to-end check)

Each stage is the same command a user types (printed before it runs), with its run folder under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "a red circle in the center",
    "a large blue square on the left",
    "a small yellow star at the top",
    "a green triangle to the left of a purple circle",
    "an orange cross above a cyan diamond",
    "a pink star on a black background",
    "a big purple square in the bottom right corner",
    "a cyan circle below an orange triangle",
]

PRESETS = {
    # experiment prefix, extra overrides per stage, evaluation samples
    "cpu": {"prefix": "demo", "data": "shapes_demo", "overrides": {}, "eval_samples": 100},
    "shapes": {
        "prefix": "shapes", "data": "shapes", "eval_samples": 1000,
        "overrides": {"clip": ["trainer.max_time=00:00:01:30"], "prior": ["trainer.max_time=00:00:01:00"],
                      "decoder": ["trainer.max_time=00:00:03:30"], "upsampler": ["trainer.max_time=00:00:01:30"]},
    },
}

FAST = {
    "train": ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
              "callbacks.model_checkpoint.every_n_train_steps=4"],
    "sample": ["prior_sampler.num_steps=4", "decoder_sampler.num_steps=4", "upsampler_samplers=[{num_steps: 3}]"],
    "eval_samples": 8,
}


def run(cmd: list[str]) -> float:
    """Run one stage's command, echoed first; its own log lands in its run folder (<stage>/<task>.log)."""
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if subprocess.run(cmd, env=env).returncode:
        raise SystemExit(f"stage failed: {' '.join(cmd)}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/demo or outputs/shapes)")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage: checks the path, not quality")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    out = Path(args.out or f"outputs/{'demo' if args.preset == 'cpu' else args.preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, prefix = sys.executable, preset["prefix"]
    train_extra = FAST["train"] if args.fast else []
    times: dict[str, float] = {}
    ckpt = {s: out / s / "checkpoints" / "last.ckpt" for s in ("clip", "prior", "decoder", "upsampler")}

    for stage in ("clip", "prior", "decoder", "upsampler"):
        cmd = [py, "train.py", f"experiment={prefix}_{stage}", f"hydra.run.dir={out / stage}", "ckpt_path=null",
               *preset["overrides"].get(stage, []), *train_extra]
        if stage in ("prior", "decoder"):
            cmd.append(f"clip.checkpoint={ckpt['clip']}")
        if ckpt[stage].exists():
            ckpt[stage].unlink()  # a fresh run, not a resume of an older demo
        times[stage] = run(cmd)

    pipeline = [f"pipeline.prior={ckpt['prior']}", f"pipeline.decoder={ckpt['decoder']}",
                f"pipeline.upsamplers=[{ckpt['upsampler']}]"]
    prompts = "prompts=[" + ",".join(PROMPTS) + "]"
    times["sample"] = run([py, "sample.py", *pipeline, prompts, f"hydra.run.dir={out / 'samples'}",
                           *(FAST["sample"] if args.fast else [])])
    n_eval = FAST["eval_samples"] if args.fast else preset["eval_samples"]
    times["evaluate"] = run([py, "evaluate.py", *pipeline, f"data={preset['data']}", f"num_samples={n_eval}",
                             f"hydra.run.dir={out / 'eval'}", *(FAST["sample"] if args.fast else [])])

    report = json.loads((out / "eval" / "eval.json").read_text())
    summary = {"preset": args.preset, "fast": args.fast, "seconds": {k: round(v, 1) for k, v in times.items()},
               "metrics": report.get("metrics", report)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + "=" * 72)
    per_stage = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    print(f"demo finished in {sum(times.values()) / 60:.1f} min  ({per_stage})")
    print(f"  samples     {out / 'samples' / 'grid.png'}  (one PNG + JSON per caption in {out / 'samples' / 'images'})")
    print(f"  metrics     {out / 'eval' / 'eval.md'}")
    print(f"  training    {out}/<stage>/samples/*.png (validation grids), <stage>/csv/ (curves), <stage>/train.log")
    print(f"  checkpoints {out}/<stage>/checkpoints/last.ckpt")
    shown = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    for k in sorted(shown)[:14]:
        print(f"    {k:>28}: {shown[k]:.4f}")


if __name__ == "__main__":
    main()
