"""The GPU proof run: everything a lent GPU should measure, in one command that ends before a deadline.

    python bench/gpu_proof.py --out /tmp/proof --archive $OUT/proof.tar.gz     on the GPU (about 9 minutes)
    python bench/gpu_proof.py --smoke --out /tmp/proof                         on a CPU: every part, tiny

Parts, in this order, each a subprocess whose log is kept and whose failure does not stop the next one:

1. `env`: nvidia-smi, torch / CUDA / device, the packages the project imports (`env.json`, `env.txt`).
2. `profile`: 150 training steps of the `shapes` decoder stage under Lightning's simple profiler (time per
   hook: the loader's next batch, the training step, the optimizer step, each callback), from an untrained
   CLIP: on the first lease every stage ran at 5-7 steps/s whatever its size, so the host, not the GPU, set
   the pace, and this says where.
3. `demo`: `python demo.py --preset shapes` (CLIP -> prior -> decoder -> upsampler on `shapes`, 64 -> 256 px,
   sampled and judged by ShapesEval from captions alone), stage budgets scaled to fit the deadline.
4. `train`: `bench/train_throughput.py` at the peer's shapes (`prior_peer` B=256, `decoder_peer` B=64), eager
   then compiled, with MFU and the ratio to the peer (`shared/bench/PEER.md`).
5. `sampling`: `bench/sampling_speed.py`: the peer's sampling work and our path 16 captions -> 256 px per stage.

Each part gets a share of the time left before `--deadline-s` and is killed at its end; whatever it wrote
stays. The folder `--out` then holds `proof.md` (what ran, how long, exit codes, the tables each part printed
last), every part's log and JSON, and the demo's summary, metrics, sample grid, validation grids and curve
plots (never its checkpoints). `--archive` packs that folder into one .tar.gz (a lent machine returns few files).
`--smoke` runs the same parts at tiny sizes on whatever device there is: it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds each part is planned to take on the GPU (scaled down together when the deadline is nearer).
PLAN_S = {"env": 20, "profile": 70, "demo": 330, "train": 120, "sampling": 60}
# The demo's stage budgets at a plan of 330 s (stages run two at a time; see demo.py's `shapes` preset).
DEMO_BUDGET_S = {"clip": 75, "upsampler": 75, "prior": 60, "decoder": 120}
DEMO_EVAL_SAMPLES = 600  # 300 in-distribution + 300 held-out captions
# The shapes preset's stages at a few images a batch on the CPU (its configs ask for a GPU and compile).
SMOKE_TRAIN_OVERRIDES = ["trainer.accelerator=cpu", "trainer.precision=32-true", "model.compile=false",
                         "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1",
                         "decoder:model.num_val_samples=2", "upsampler:model.num_val_samples=2",
                         *[f"{stage}:model.sampler.num_steps=2" for stage in ("prior", "decoder", "upsampler")]]
# A benchmark starts no configuration this close to its part's end (a compilation plus timed steps fit in it).
BENCH_TAIL_S = {"train": 60, "sampling": 15}


def part_command(part: str, args: argparse.Namespace, out: Path, scale: float, timeout: float) -> list[str]:
    """The command of one part; `scale` (<= 1) shrinks the demo's stage budgets to the deadline, and the
    benchmarks start no configuration in the last `BENCH_TAIL_S` seconds of their `timeout`."""
    py = sys.executable
    if args.smoke:
        train = ["--device", args.device, "--precision", "fp32", "--preset", "prior_tiny", "decoder_tiny",
                 "--batch", "4", "--steps", "2", "--warmup", "1", "--compile", "both",
                 "--compile-backend", "aot_eager", "--optim", "foreach"]
        sampling = ["--device", args.device, "--precision", "fp32", "--prior", "prior_tiny", "--decoder",
                    "decoder_tiny", "--upsampler", "upsampler_tiny", "--lowres-size", "16", "--steps", "2",
                    "--repeats", "1", "--num-captions", "2", "--num-embeds", "4", "--num-images", "2"]
        profile = [o.removeprefix("decoder:") for o in SMOKE_TRAIN_OVERRIDES if o.partition(":")[0] in ("decoder", o)]
        profile.append("trainer.max_steps=3")
        demo = ["--preset", "shapes", "--fast", "--eval-samples", "8"]
        demo += [f"--train-override={o}" for o in SMOKE_TRAIN_OVERRIDES]
    else:
        train = ["--preset", "prior_peer", "decoder_peer", "--batch", "256", "64", "--compile", "both",
                 "--optim", "fused", "--extras", "none"]
        sampling = ["--repeats", "2"]
        profile = ["trainer.max_steps=150", "model.compile=false"]
        # no torch.compile in the demo: compiling a UNet took longer than a 75 s budget on the H200's 16 cores
        # with two stages' loaders beside it (the upsampler trained 1 step, the decoder overran its phase)
        demo = ["--preset", "shapes", "--eval-samples", str(args.eval_samples), "--train-override=model.compile=false"]
        demo += [f"--budget={stage}={hms(seconds * scale)}" for stage, seconds in DEMO_BUDGET_S.items()]
    budget = ["--budget-s", f"{max(1.0, timeout - BENCH_TAIL_S[part]):.0f}"] if part in BENCH_TAIL_S else []
    return {
        "env": [py, str(ROOT / "bench" / "gpu_proof.py"), "--env-only", "--out", str(out)],
        "profile": [py, "train.py", "experiment=shapes_decoder", "clip.checkpoint=null", "ckpt_path=null",
                    "+trainer.profiler=simple", "trainer.val_check_interval=100000",
                    f"hydra.run.dir={out / 'profile_run'}", *profile],
        "demo": [py, "demo.py", *demo, "--out", str(out / "demo_run")],
        "train": [py, "bench/train_throughput.py", *train, *budget, "--out", str(out / "train_throughput.json")],
        "sampling": [py, "bench/sampling_speed.py", *sampling, *budget, "--out", str(out / "sampling_speed.json")],
    }[part]


def hms(seconds: float) -> str:
    """Seconds as Lightning's DD:HH:MM:SS."""
    s = max(10, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_env(out: Path) -> None:
    """The machine as the parts see it: GPU, driver, torch, CUDA and the versions of what the project imports."""
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    for name in ("pytorch-lightning", "lightning", "hydra-core", "open_clip_torch", "webdataset", "diffusers",
                 "torchmetrics", "wandb", "numpy", "pillow"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    (out / "env.json").write_text(json.dumps(info, indent=2))
    smi = shutil.which("nvidia-smi")
    text = subprocess.run([smi], capture_output=True, text=True).stdout if smi else "no nvidia-smi\n"
    (out / "env.txt").write_text(text)
    print(json.dumps(info, indent=2))


def run_part(name: str, cmd: list[str], timeout: float, out: Path) -> dict:
    """Run one part with its output in `<out>/<name>.log`, killed (its whole process group) at `timeout`."""
    log_path = out / f"{name}.log"
    print(f"\n[{name}] timeout {timeout:.0f}s: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:  # also when this script is stopped: a part in its own session would outlive it otherwise
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - start
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    print(f"[{name}] exit {rc} after {seconds:.0f}s; log tail:\n" + "\n".join(tail[-15:]), flush=True)
    return {"part": name, "rc": rc, "seconds": round(seconds, 1), "command": " ".join(cmd), "tail": tail}


def collect_demo(run_dir: Path, out: Path) -> None:
    """The demo's results without its checkpoints or data: summary, metrics, grids, curves, CSV logs, stage logs."""
    keep = ["summary.json", "eval/eval.json", "eval/eval.md", "samples/grid.png", "plots/*.png",
            "*/train.log", "*/samples/*.png", "*/csv/*/metrics.csv"]
    for pattern in keep:
        for path in run_dir.glob(pattern):
            target = out / "demo" / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def write_report(out: Path, results: list[dict], started: float) -> None:
    lines = [f"# GPU proof run ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
             f"{time.monotonic() - started:.0f} s)", ""]
    lines += ["| part | exit | seconds |", "|---|---|---:|"]
    lines += [f"| {r['part']} | {r['rc']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['part']}", "", "```", f"$ {r['command']}", *r["tail"], "```"]
    (out / "proof.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results (emptied first)")
    p.add_argument("--archive", default=None, help="also pack --out into this .tar.gz")
    p.add_argument("--deadline-s", type=float, default=540.0, help="every part ends within this many seconds")
    p.add_argument("--parts", nargs="+", choices=list(PLAN_S), default=list(PLAN_S))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script")
    p.add_argument("--device", default="cpu", help="--smoke's device for the benchmark parts")
    p.add_argument("--demo-scale", type=float, default=None,
                   help="scale the demo's stage budgets by this (default: to fit --deadline-s)")
    p.add_argument("--eval-samples", type=int, default=DEMO_EVAL_SAMPLES, help="captions the demo evaluates")
    p.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.env_only:
        write_env(out)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_part's clean-up
    started = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    planned = sum(PLAN_S[part] for part in args.parts)
    scale = min(1.0, args.deadline_s / planned) if args.demo_scale is None else args.demo_scale
    results = []
    for i, part in enumerate(args.parts):
        left = args.deadline_s - (time.monotonic() - started)
        later = sum(PLAN_S[q] for q in args.parts[i + 1:]) * scale
        # a part may use its plan and whatever earlier parts left unused, never the later parts' share
        timeout = left - later
        results.append(run_part(part, part_command(part, args, out, scale, timeout), timeout, out))
        if part == "profile":
            shutil.rmtree(out / "profile_run", ignore_errors=True)
        if part == "demo":
            collect_demo(out / "demo_run", out)
            shutil.rmtree(out / "demo_run", ignore_errors=True)
        write_report(out, results, started)
    if args.archive:
        Path(args.archive).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
    failed = [r["part"] for r in results if r["rc"] != 0]
    print(f"\nproof run done in {time.monotonic() - started:.0f}s; failed or cut: {failed or 'none'}; "
          f"{out / 'proof.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
