"""The whole unCLIP pipeline on the embedded `shapes` data: train CLIP -> prior -> decoder -> upsampler, sample
a grid for a few captions, evaluate from captions alone, plot the training curves, and print where it all is.

    python demo.py                      the CPU demo: 2 cores, 14.3 minutes at 175 GFLOP/s (less on faster cores),
                                        a simpler caption grammar (one large object per image; 32 px decoder ->
                                        64 px upsampler)
    python demo.py --preset cpu_study   the CPU study: 2 cores, 52 to 62 minutes, the full `shapes` grammar
    python demo.py --preset shapes      the GPU run (64 px -> 256 px; one H100/H200, about 7 minutes)
    python demo.py --fast               a few steps per stage (the test suite's end-to-end check)

Each stage is the same command a user types (printed before it runs), with its run folder and log under --out.
On the CPU presets the work is spread over both cores: CLIP trains first (one process with two threads); its
embeddings of the data are then computed once (`unclip.data.embed`), and the prior trains on them beside the
upsampler (which needs no CLIP), one core each; last the decoder, the stage that needs the most compute, trains
as two data-parallel ranks.

The CPU demo does a fixed amount of work per stage (`trainer.max_steps`): the step counts at which its figures
were measured, so a slower machine takes longer but trains the same models (2-core machines differ by 1.8x in
matrix throughput; with a time budget alone, the slower one trained 60% of the steps and drew the wrong colours
in the wrong places). Each stage's time cap (`trainer.max_time`) bounds the run on a much slower machine: the run
measures its step rate and ends, annealed, within the cap, and the demo says which stages fell short of their
steps. The other presets have time budgets only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIMPLE_PROMPTS = [  # the demo's grammar: one large object; the last two name held-out colour-shape pairs
    "a large red circle in the center",
    "a large blue square on the left",
    "a large yellow star at the top",
    "a large green cross in the bottom right corner",
    "a large purple triangle in the top left, black background",
    "a large cyan diamond at the bottom, on a white background",
    "a large orange star on the right",
    "a large yellow circle in the bottom left",
]
FULL_PROMPTS = [
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
    "cpu": {
        "prefix": "demo", "data": "shapes_demo", "eval_samples": 400, "prompts": SIMPLE_PROMPTS,
        # CLIP as one process with two threads (18% faster a step than two ranks here), the rest one core each
        "phases": [(("clip",), 2), (("prior", "upsampler"), 1), (("decoder",), 1)], "precompute": True,
        "steps": {"clip": 1500, "prior": 850, "upsampler": 200, "decoder": 2000},
        "budgets": {"clip": "00:00:06:00", "upsampler": "00:00:02:30", "prior": "00:00:02:30",
                    "decoder": "00:00:13:00"},
        "grammar": "a simpler caption grammar than `shapes`' full one: one large object per image (colour, shape, "
                   "position, background); `python demo.py --preset cpu_study` trains on the full grammar",
    },
    "cpu_study": {
        "prefix": "study", "data": "shapes_study", "eval_samples": 1000, "prompts": FULL_PROMPTS,
        "phases": [(("clip",), 2), (("prior", "upsampler"), 1), (("decoder",), 1)], "precompute": True,
        # the CLIP reads colour and position by its step 2,000 (4.5 min), the prior converges in its first 1,000
        # steps and the upsampler passes its bar by then (RESULTS.md): their minutes go to the decoder, whose
        # two-object scenes are still improving at the end (colour from true embeddings 0.32 -> 0.46, steps 4k -> 10.5k)
        "budgets": {"clip": "00:00:08:00", "upsampler": "00:00:05:00", "prior": "00:00:05:00",
                    "decoder": "00:00:38:00"},
        "grammar": "the full `shapes` grammar (one or two objects, three sizes, relations)",
    },
    "shapes": {
        "prefix": "shapes", "data": "shapes", "eval_samples": 1000, "prompts": FULL_PROMPTS,
        # one GPU shared by two stages at a time: CLIP beside the upsampler (which needs no CLIP), then the
        # prior beside the decoder; small nets leave most of an H100/H200 idle when run one at a time
        "phases": [(("clip", "upsampler"), None), (("prior", "decoder"), None)],
        "precompute": False,
        "budgets": {"clip": "00:00:01:30", "upsampler": "00:00:01:30", "prior": "00:00:01:15",
                    "decoder": "00:00:03:00"},
        "grammar": "the full `shapes` grammar",
    },
}

# The quality bars each preset is held to (issue 11 for the CPU presets; docs/RESULTS.md "The GPU quality bars"
# for `shapes`): ShapesEval from captions alone, keys of evaluate.py's report -> the least figure that meets it.
BARS = {
    "cpu": {"shapes_indist_colour": 0.80, "shapes_indist_position": 0.60, "shapes_indist_background": 0.90,
            "shapes_indist_shape": 0.40, "shapes_indist_all": 0.20, "shapes_heldout_colour": 0.60},
    "cpu_study": {"shapes_indist_colour": 0.95, "shapes_indist_position": 0.85, "shapes_indist_shape": 0.75,
                  "shapes_indist_size": 0.70, "shapes_indist_relation": 0.80, "shapes_indist_all": 0.50,
                  "shapes_heldout_all": 0.30},
    "shapes": {"shapes_indist_all": 0.80, "shapes_heldout_all": 0.50},
}
SCENE_KINDS = ("objects1", "objects2")  # evaluate.py's figures over one-object and two-object captions


def check_bars(metrics: dict[str, float], bars: dict[str, float]) -> list[dict]:
    """One row per bar: the figure, the bar, whether it is met, and the same attribute over one-object and two-
    object captions (evaluate.py's `shapes_objects{1,2}_*`; None where a kind has no such figure, e.g. relation
    for one object), so a shortfall shows which kind of scene holds it back. A figure missing from the report
    counts as not met."""
    rows = []
    for key, bar in bars.items():
        value = metrics.get(key)  # None: absent from the report, or null there (not computable)
        attribute = key.split("_", 2)[2]
        kinds = {kind: metrics.get(f"shapes_{kind}_{attribute}") for kind in SCENE_KINDS}
        rows.append({"key": key, "value": value, "bar": bar, "met": value is not None and value >= bar, **kinds})
    return rows


def format_bars(rows: list[dict]) -> list[str]:
    """The rows of `check_bars` as aligned text lines, a header first."""
    def fig(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    lines = [f"    {'figure':>24}  {'value':>6}  {'bar':>6}  {'':<14}  {'1 object':>8}  {'2 objects':>9}"]
    for r in rows:
        verdict = "met" if r["met"] else ("missing" if r["value"] is None else f"short {r['bar'] - r['value']:.3f}")
        lines.append(f"    {r['key']:>24}  {fig(r['value']):>6}  {r['bar']:>6.2f}  {verdict:<14}  "
                     f"{fig(r['objects1']):>8}  {fig(r['objects2']):>9}")
    return lines


FAST = {
    "train": ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
              "callbacks.model_checkpoint.every_n_train_steps=4"],
    "sample": ["prior_sampler.num_steps=4", "decoder_sampler.num_steps=4", "upsampler_samplers=[{num_steps: 3}]"],
    "eval_samples": 8,
}
STAGES = ("clip", "prior", "decoder", "upsampler")
SPLITS = {"train": "${data.train_shards}", "val": "${data.val_shards[0]}", "heldout": "${data.val_shards[1]}"}
PRECOMPUTED = {"prior": "[image_embed,text_embed,text_tokens,text_mask]",
               "decoder": "[image_embed,text_tokens,text_mask]"}


def embed_commands(py: str, data: str, clip_ckpt: Path, emb: Path) -> dict[str, list[str]]:
    """One `unclip.data.embed` command per split: the finished CLIP's embeddings and caption tokens, stored once
    beside each sample, so the prior and the decoder do not run CLIP at every step."""
    return {f"embed_{split}": [py, "-m", "unclip.data.embed", f"data={data}", "clip=demo",
                               f"clip.checkpoint={clip_ckpt}", f"shards={pattern}", f"out_dir={emb / split}",
                               "text_tokens=true", "num_workers=1", "progress=false",
                               f"hydra.run.dir={emb / 'logs' / split}"]
            for split, pattern in SPLITS.items()}


def precomputed_overrides(stage: str, emb: Path) -> list[str]:
    """Train `stage` (prior or decoder) on the embedded shards of `embed_commands`."""
    extra = ["++data.load_image=false"] if stage == "prior" else []  # the prior needs only the embeddings
    return [f"data.train_shards={emb / 'train'}/*.tar",
            f"data.val_shards=[{emb / 'val'}/*.tar,{emb / 'heldout'}/*.tar]", f"data.precomputed={PRECOMPUTED[stage]}",
            *extra]


def trained_steps(run_dir: Path) -> int | None:
    """The last optimizer step a stage logged (its CSV curves), or None without them."""
    last = None
    for path in run_dir.glob("csv/*/metrics.csv"):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("step"):
                    last = max(last or 0, int(float(row["step"])) + 1)
    return last


def matmul_gflops(threads: int = 2) -> float:
    """This machine's fp32 matmul rate in GFLOP/s at `threads` threads, recorded with the demo's times: what
    makes them comparable across machines."""
    import torch

    from unclip.utils.machine import matmul_flops_per_s

    torch.set_num_threads(threads)
    return matmul_flops_per_s(repeats=5) / 1e9


def parse_budgets(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """`--budget stage=DD:HH:MM:SS` items as {stage: budget}; a wrong stage or format is a usage error."""
    budgets = {}
    for item in items:
        stage, _, budget = item.partition("=")
        fields = budget.split(":")
        if stage not in STAGES or len(fields) != 4 or not all(f.isdigit() for f in fields):
            parser.error(f"--budget {item!r}: expected STAGE=DD:HH:MM:SS with STAGE one of {', '.join(STAGES)}")
        budgets[stage] = budget
    return budgets


def stage_overrides(items: list[str], stage: str) -> list[str]:
    """The `--train-override` items for `stage`: unscoped ones and those written `stage:key=value`."""
    picked = []
    for item in items:
        scope, colon, rest = item.partition(":")
        if colon and scope in (*STAGES, "data") and "=" not in scope:
            if scope == stage:
                picked.append(rest)
        else:
            picked.append(item)
    return picked


def hydra_quoted(text: str) -> str:
    """A string as a quoted Hydra override value (commas and brackets stay part of it)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if threads:  # side-by-side stages and data-parallel ranks: one core each, no oversubscription
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_parallel(commands: dict[str, list[str]], logs: dict[str, Path], threads: int | None) -> dict[str, float]:
    """Run the commands side by side (each echoed, its output in its log); returns each one's seconds."""
    start, procs, seconds = time.monotonic(), {}, {}
    for name, cmd in commands.items():
        print(f"\n$ {' '.join(cmd)}\n  (log: {logs[name]})", flush=True)
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen(cmd, env=stage_env(threads), stdout=log, stderr=subprocess.STDOUT)
    failed = []
    while procs:
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                seconds[name] = time.monotonic() - start
                del procs[name]
                if proc.returncode:
                    failed.append(name)
                    for other in procs.values():
                        other.terminate()
                else:
                    print(f"  {name} done in {seconds[name]:.0f}s", flush=True)
        time.sleep(0.5)
    if failed:
        for name in failed:
            tail = logs[name].read_text(errors="replace").splitlines()[-25:]
            print(f"\nstage {name} failed; the end of {logs[name]}:\n" + "\n".join(tail), file=sys.stderr)
        raise SystemExit(f"stage failed: {', '.join(failed)}")
    return seconds


def run(cmd: list[str], threads: int | None = None) -> float:
    """Run one command in the foreground, echoed first."""
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    if subprocess.run(cmd, env=stage_env(threads)).returncode:
        raise SystemExit(f"stage failed: {' '.join(cmd)}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/demo, outputs/<preset>)")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage: checks the path, not quality")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=DD:HH:MM:SS",
                        help="replace a stage's time budget (repeatable), e.g. --budget decoder=00:00:02:00")
    parser.add_argument("--eval-samples", type=int, default=None, help="captions evaluated (default: the preset's)")
    parser.add_argument("--train-override", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="a Hydra override added to every stage's train.py command, or to STAGE's alone "
                             "(repeatable), e.g. --train-override upsampler:model.num_val_samples=4")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    preset["budgets"] = {**preset["budgets"], **parse_budgets(parser, args.budget)}
    if args.eval_samples is not None:
        preset["eval_samples"] = args.eval_samples
    out = Path(args.out or f"outputs/{'demo' if args.preset == 'cpu' else args.preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, prefix = sys.executable, preset["prefix"]
    times: dict[str, float] = {}
    ckpt = {s: out / s / "checkpoints" / "last.ckpt" for s in STAGES}
    print(f"preset {args.preset}: {preset['grammar']}", flush=True)
    gflops = matmul_gflops()
    print(f"machine: {os.cpu_count()} cores, fp32 matmul {gflops:.0f} GFLOP/s at 2 threads", flush=True)
    wall = time.monotonic()

    times["data"] = run([py, "train.py", f"experiment={prefix}_clip", f"hydra.run.dir={out / 'data'}",
                         "prepare_only=true", *stage_overrides(args.train_override, "data")])
    # (the data is generated once, before stages start side by side)
    emb = out / "data" / "embed"
    for phase, threads in preset["phases"]:
        commands = {}
        if "prior" in phase and preset["precompute"]:
            shutil.rmtree(emb, ignore_errors=True)  # embeddings of this run's CLIP, not a resume of older ones
            times.update(run_parallel(embed_commands(py, preset["data"], ckpt["clip"], emb),
                                      {f"embed_{s}": emb / "logs" / f"{s}.log" for s in SPLITS}, threads=1))
        for stage in phase:
            # its output goes to a log file, where a live progress bar is only a thread redrawing (4% of the
            # decoder's step time on two cores, docs/PERFORMANCE.md)
            cmd = [py, "train.py", f"experiment={prefix}_{stage}", f"hydra.run.dir={out / stage}", "ckpt_path=null",
                   "trainer.enable_progress_bar=false"]
            cmd += FAST["train"] if args.fast else [f"+trainer.max_time={preset['budgets'][stage]}"]
            if not args.fast and stage in preset.get("steps", {}):
                cmd.append(f"trainer.max_steps={preset['steps'][stage]}")
            if threads is None and len(phase) > 1 and not args.fast:  # stages side by side share the loader cores
                cmd.append(f"data.num_workers={max(1, (os.cpu_count() or 2) // len(phase) - 1)}")
            if stage in ("prior", "decoder"):
                cmd.append(f"clip.checkpoint={ckpt['clip']}")
                if preset["precompute"]:
                    cmd += precomputed_overrides(stage, emb)
            cmd += stage_overrides(args.train_override, stage)
            shutil.rmtree(out / stage, ignore_errors=True)  # a fresh run, not a resume of an older demo
            commands[stage] = cmd
        times.update(run_parallel(commands, {s: out / s / "train.log" for s in commands}, threads))

    steps = {s: trained_steps(out / s) for s in STAGES}
    target = {} if args.fast else preset.get("steps", {})
    short = {s: (steps[s], n) for s, n in target.items() if steps[s] is not None and steps[s] < n}
    pipeline = [f"pipeline.prior={ckpt['prior']}", f"pipeline.decoder={ckpt['decoder']}",
                f"pipeline.upsamplers=[{ckpt['upsampler']}]"]
    prompts = "prompts=[" + ",".join(hydra_quoted(p) for p in preset["prompts"]) + "]"
    sample_extra = FAST["sample"] if args.fast else []
    times["sample"] = run([py, "sample.py", *pipeline, prompts, f"hydra.run.dir={out / 'samples'}", *sample_extra])
    n_eval = FAST["eval_samples"] if args.fast else preset["eval_samples"]
    times["evaluate"] = run([py, "evaluate.py", *pipeline, f"data={preset['data']}", f"num_samples={n_eval}",
                             f"hydra.run.dir={out / 'eval'}", *sample_extra])
    times["plots"] = run([py, "-m", "unclip.plots", *[str(out / s) for s in STAGES], "--out", str(out / "plots")])

    report = json.loads((out / "eval" / "eval.json").read_text())
    total = time.monotonic() - wall
    summary = {"preset": args.preset, "fast": args.fast, "grammar": preset["grammar"], "minutes": round(total / 60, 2),
               "matmul_gflops": round(gflops, 1), "cpu_count": os.cpu_count(),
               "seconds": {k: round(v, 1) for k, v in times.items()}, "steps": steps, "target_steps": target,
               "metrics": report.get("metrics", report)}
    bars = check_bars(summary["metrics"], BARS.get(args.preset, {}))
    summary["bars"] = bars
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + "=" * 72)
    per_stage = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    print(f"demo finished in {total / 60:.1f} min  ({per_stage}; side-by-side stages overlap)")
    print(f"  grammar     {preset['grammar']}")
    print("  steps       " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    for stage, (done, wanted) in short.items():
        print(f"  NOTE        {stage} reached {done} of its {wanted} steps within its time cap: this machine is "
              "slower than the demo is sized for, and its figures will be lower than docs/RESULTS.md's")
    print(f"  samples     {out / 'samples' / 'grid.png'}  (one PNG + JSON per caption in {out / 'samples' / 'images'})")
    print(f"  metrics     {out / 'eval' / 'eval.md'}")
    if (out / "eval" / "shapes_scenes.jsonl").is_file():
        print(f"  per image   {out / 'eval' / 'shapes_scenes.jsonl'}  (caption, what ShapesEval read, each check)")
    print(f"  curves      {out / 'plots'}/loss.png, quality.png")
    print(f"  training    {out}/<stage>/samples/*.png (validation grids), <stage>/csv/ (curves), <stage>/train.log")
    print(f"  checkpoints {out}/<stage>/checkpoints/last.ckpt")
    metrics = summary["metrics"]
    shown = [k for k in sorted(metrics) if k.startswith("shapes_") and "_decoder_" not in k]
    shown += [k for k in ("clip_score", "fd_clip", "fid", "is_mean") if k in metrics]
    for k in shown:  # a metric that could not be computed is null in eval.json
        print(f"    {k:>32}: " + ("n/a" if metrics[k] is None else f"{metrics[k]:.4f}"))
    if bars:
        met = sum(r["met"] for r in bars)
        print(f"  bars        {met} of {len(bars)} met (the preset's quality bars, docs/RESULTS.md; in summary.json)"
              + ("; --fast checks the path, its figures are not the preset's" if args.fast else ""))
        print("\n".join(format_bars(bars)))
        print("    (the one- and two-object columns are over both splits)")


if __name__ == "__main__":
    main()
