"""Ours against the public peer (`dalle2-pytorch` 1.15.6) on the CPU, side by side, at matched shapes.

    python bench/side_by_side.py --setup-peer                      # once: the peer's own virtualenv
    python bench/side_by_side.py --lock /tmp/cpu.lock --out side_by_side.json
    python bench/side_by_side.py --smoke --out smoke.json          # tiny shapes, 1 step, seconds

Works (`--works`), each on the same shapes for both sides (SHAPES below; params and FLOPs printed for both):
    prior_train     prior training step (forward + backward + AdamW), B=64
    decoder_train   decoder UNet training step at 32 px, B=16
    prior_sample    16 image embeddings, 32 DDIM steps, guidance 2
    decoder_sample  4 images at 32 px, 25 DDIM steps, guidance 3

Every measurement runs in a fresh worker subprocess (this file with `--worker ours|peer`): ours with this
interpreter, the peer with `--peer-python` (default `.peer-venv/bin/python`, made by `--setup-peer`), each with
`--threads` intra-op threads (OMP_NUM_THREADS and torch.set_num_threads), fp32. Workers alternate, ours, peer,
ours, peer, ... for `--rounds` rounds per work, and each work reports the median over rounds of samples/s
(training: batch / mean step time over `--steps` steps after `--warmup`; sampling: samples / seconds of one
whole call after a warm-up call), effective FLOP/s (samples/s x FLOPs/sample), and ours / peer.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` around one real forward + backward of the training loss (the
counter sees matmuls, convolutions and attention), or around one whole sampling call, divided by the samples.
Memory: `peak RSS delta`, the worker's peak resident set (getrusage ru_maxrss) over the timed work minus its
resident set just before it (net, inputs and, for training, nothing of the optimizer yet: AdamW's state is
allocated in the first step and counted). `--fit` also finds, per training work, the largest batch B * 2^k
whose first two steps stay within `--mem-cap-gib` of peak RSS delta (one fresh worker per batch size), so
"fits" means "fits in that cap".

`--lock PATH` takes an exclusive flock(2) on PATH around each work (the same lock as `flock PATH cmd`), so
shared cores are not measured while another job holds them. Without the peer's virtualenv the peer side is
skipped with a message and only ours is measured. `--out` holds the environment, the shapes, every worker's
record and the per-work summary, rewritten after each worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEER_PACKAGE = "dalle2-pytorch==1.15.6"
PEER_TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
DEFAULT_PEER_VENV = ROOT / ".peer-venv"

# Matched shapes. Ours: the net's constructor arguments; the peer: its classes' arguments. Widths, depths,
# heads and resolutions agree; the few differences (our MLP ratio, our decoder's channel multipliers) bring
# parameters and FLOPs per sample within a few percent of the peer's, which every record prints.
SHAPES: dict[str, dict[str, Any]] = {
    "prior": {
        # 81 tokens on both sides: 77 caption tokens, text embedding, time, noised image embedding, query.
        "ours": {"embed_dim": 256, "text_token_dim": 256, "num_text_tokens": 77, "width": 256, "depth": 4,
                 "heads": 4, "dropout": 0.0, "mlp_ratio": 5.5},  # its SwiGLU FF has 3 matrices of 4x: ~12 w^2
        "peer": {"dim": 256, "depth": 4, "dim_head": 64, "heads": 4, "num_timesteps": 1000, "max_text_len": 77},
        "text_tokens": 77,
    },
    "decoder": {
        "ours": {"image_size": 32, "model_channels": 64, "channel_mult": [1, 1, 4], "num_res_blocks": 2,
                 "attention_resolutions": [16, 8], "num_head_channels": 32, "image_embed_dim": 256,
                 "text_token_dim": 256, "dropout": 0.0},
        # The peer's stages run at dim_in (64@32, 64@16, 128@8 px, middle 256@8), self-attention at 8 px.
        "peer": {"dim": 64, "dim_mults": [1, 2, 4], "num_resnet_blocks": 2, "image_embed_dim": 256,
                 "text_embed_dim": 256, "cond_dim": 128, "cond_on_text_encodings": True,
                 "cond_on_image_embeds": True, "self_attn": [False, False, True], "attn_heads": 8,
                 "attn_dim_head": 32, "max_text_len": 77},
        "text_tokens": 77,
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "prior": {
        "ours": {"embed_dim": 32, "text_token_dim": 32, "num_text_tokens": 8, "width": 32, "depth": 1, "heads": 2},
        "peer": {"dim": 32, "depth": 1, "dim_head": 16, "heads": 2, "num_timesteps": 1000, "max_text_len": 8},
        "text_tokens": 8,
    },
    "decoder": {
        "ours": {"image_size": 16, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_resolutions": [8], "num_head_channels": 8, "image_embed_dim": 32, "text_token_dim": 32},
        "peer": {"dim": 8, "dim_mults": [1, 2], "num_resnet_blocks": 1, "image_embed_dim": 32, "text_embed_dim": 32,
                 "cond_dim": 16, "cond_on_text_encodings": True, "cond_on_image_embeds": True,
                 "self_attn": [False, True], "attn_heads": 2, "attn_dim_head": 8, "max_text_len": 8},
        "text_tokens": 8,
    },
}
# Per work: batch (training) or samples, DDIM steps and guidance (sampling).
WORKS: dict[str, dict[str, Any]] = {
    "prior_train": {"net": "prior", "kind": "train", "batch": 64},
    "decoder_train": {"net": "decoder", "kind": "train", "batch": 16},
    "prior_sample": {"net": "prior", "kind": "sample", "samples": 16, "steps": 32, "cond_scale": 2.0},
    "decoder_sample": {"net": "decoder", "kind": "sample", "samples": 4, "steps": 25, "cond_scale": 3.0},
}
SMOKE_WORKS: dict[str, dict[str, Any]] = {
    "prior_train": {"net": "prior", "kind": "train", "batch": 4},
    "decoder_train": {"net": "decoder", "kind": "train", "batch": 2},
    "prior_sample": {"net": "prior", "kind": "sample", "samples": 2, "steps": 2, "cond_scale": 2.0},
    "decoder_sample": {"net": "decoder", "kind": "sample", "samples": 2, "steps": 2, "cond_scale": 3.0},
}


# ---------------------------------------------------------------------- shared by both workers (torch only)
def rss_bytes() -> int:
    """The process's resident set now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (matmul, conv, attention) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def fill_zero_init(net, std: float = 1e-3) -> None:
    """Small random values in exactly-zero parameters (zero-initialised output layers), as for a trained net."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


class CallCounter:
    """Counts a module's calls and the rows they saw: net evaluations, and how many samples they carried
    (guidance as two passes, or as one stacked pass of twice the rows, gives the same rows)."""

    def __init__(self, module) -> None:
        self.calls = self.rows = 0
        module.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0]) if args else 0


def timed_calls(fn, warmup: int, n: int) -> tuple[list[float], Any, dict[str, int]]:
    """`warmup` untimed calls of `fn`, then `n` timed ones: (seconds per call, the last output, RSS figures)."""
    before = rss_bytes()
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out, {"rss_before_bytes": before, "peak_rss_delta_bytes": max(0, peak_rss_bytes() - before)}


def time_train(step, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps, then `steps` timed steps; peak RSS delta over all of them."""
    times, _, memory = timed_calls(step, warmup, steps)
    return {"step_s": times, **memory}


def time_sample(call, warmup: int, repeats: int) -> dict[str, Any]:
    """Warm-up calls, then `repeats` timed calls of the whole sampler; peak RSS delta over all of them."""
    import torch

    times, out, memory = timed_calls(call, warmup, repeats)
    if not torch.isfinite(out).all():
        raise FloatingPointError("sampling produced non-finite values")
    return {"call_s": times, **memory}


# ---------------------------------------------------------------------- our side
def ours_work(work: dict[str, Any], shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Our training step (bench/train_throughput.py's) or sampling call (bench/sampling_speed.py's)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sampling_speed
    import train_throughput as tt

    from unclip.diffusion.embed_norm import EmbedNormalizer
    from unclip.nets import PriorTransformer, UNet

    cls = PriorTransformer if work["net"] == "prior" else UNet
    net = cls(**shape["ours"])
    params = tt.param_count(net)
    device = torch.device("cpu")
    if work["kind"] == "train":
        stage = tt.stage_of(net)
        settings = tt.stage_settings(stage)
        diffusion = tt.build_diffusion(settings)
        channels_last = args.channels_last and stage != "prior"
        if channels_last:
            net.to(memory_format=torch.channels_last)
        net.train()
        data = tt.random_data(net, stage, work["batch"], device, channels_last)
        if stage == "decoder" and "text_tokens" in data:  # the peer's caption length, not the default 77
            data["text_tokens"] = data["text_tokens"][:, : shape["text_tokens"]]
            data["text_mask"] = data["text_mask"][:, : shape["text_tokens"]]
        normalizer = EmbedNormalizer(net.config["embed_dim"], settings.get("embed_norm", "l2")) \
            if stage == "prior" else None
        inputs = lambda: tt.step_inputs(stage, net.config, data, settings, diffusion, normalizer)  # noqa: E731
        if args.compile:
            net.compile(dynamic=False)
        optimizer = tt.make_optimizer(net, settings, "fused")
        step = tt.make_step(net, diffusion, inputs, optimizer, contextlib.nullcontext, None, None)

        def loss_fwd_bwd() -> None:
            x0, cond = inputs()
            diffusion.training_losses(net, x0, **cond)["loss"].mean().backward()

        return {"params": params, "optimizer": "AdamW(fused)", "compile": args.compile,
                "channels_last": channels_last, **run_train(step, loss_fwd_bwd, optimizer.zero_grad, work, args)}
    stage = sampling_speed.Stage(work["net"], device, args.channels_last, net=net)
    sampler = stage.with_sampler(work["steps"], work["cond_scale"])
    if work["net"] == "prior":
        call = sampling_speed.prior_call(stage, work["samples"], 1, sampler)
    else:
        call = sampling_speed.decoder_call(stage, work["samples"], sampler)
        if shape["text_tokens"] != 77:  # decoder_call draws 77 caption tokens; the smoke shapes use fewer
            call = smoke_decoder_call(stage, work, sampler, shape["text_tokens"])
    if args.compile:
        stage.net.compile(dynamic=False)
    counter = CallCounter(stage.net.out)  # the output layer: once per net evaluation, cached prefix or not
    return {"params": params, "sampler": sampler.to_dict(), "compile": args.compile,
            "channels_last": stage.channels_last, **run_sample(call, counter, work, args)}


def smoke_decoder_call(stage, work: dict[str, Any], sampler, tokens: int):
    """sampling_speed.decoder_call with `tokens` caption tokens."""
    import torch
    import torch.nn.functional as F

    from unclip.generate import DECODER_DROP, sample_images

    cfg, n = stage.net.config, work["samples"]
    g = torch.Generator().manual_seed(2)
    cond = {"image_embed": F.normalize(torch.randn(n, cfg["image_embed_dim"], generator=g), dim=-1),
            "text_tokens": torch.randn(n, tokens, cfg["text_token_dim"], generator=g),
            "text_mask": torch.ones(n, tokens, dtype=torch.bool)}
    shape = (n, cfg["out_channels"], cfg["image_size"], cfg["image_size"])
    return lambda: sample_images(stage.net, stage.diffusion, cond, shape, sampler, DECODER_DROP, seeds=list(range(n)))


# ---------------------------------------------------------------------- the peer's side
def peer_work(work: dict[str, Any], shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The peer's training step (its DiffusionPrior / Decoder loss, backward, AdamW) or sampling call."""
    import torch

    with contextlib.redirect_stdout(sys.stderr):  # its imports print
        import dalle2_pytorch as peer

    g = torch.Generator().manual_seed(0)
    L = shape["text_tokens"]
    if work["net"] == "prior":
        d = shape["peer"]["dim"]
        net = peer.DiffusionPriorNetwork(**shape["peer"])
        model = peer.DiffusionPrior(net, image_embed_dim=d, timesteps=1000, cond_drop_prob=0.1,
                                    condition_on_text_encodings=True)
        core, out_layer = net, net.causal_transformer  # its guidance calls forward() itself, past any hook
    else:
        net = peer.Unet(**shape["peer"])
        model = peer.Decoder(unet=net, image_size=shape["ours"]["image_size"], timesteps=1000,
                             image_cond_drop_prob=0.1, text_cond_drop_prob=0.5, learned_variance=False,
                             sample_timesteps=work.get("steps"))
        core, out_layer = net, net.to_out
        d = shape["peer"]["image_embed_dim"]
    params = sum(p.numel() for p in core.parameters())
    n = work.get("batch") or work["samples"]
    text_embed = torch.randn(n, d, generator=g)
    text_enc = torch.randn(n, L, shape["peer"].get("text_embed_dim", d), generator=g)
    image_embed = torch.randn(n, d, generator=g)
    if work["kind"] == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # its trainers' default AdamW
        size = shape["ours"].get("image_size")
        images = torch.rand(n, 3, size, size, generator=g) if size else None  # in [0, 1]: it normalises

        def loss():
            if work["net"] == "prior":  # it scales image_embed in place: hand it a copy
                return model(text_embed=text_embed, image_embed=image_embed.clone(), text_encodings=text_enc)
            return model(images, image_embed=image_embed, text_encodings=text_enc)

        def step():
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return {"params": params, "optimizer": "AdamW(default)",
                **run_train(step, lambda: loss().backward(), optimizer.zero_grad, work, args)}
    model.eval()
    fill_zero_init(model)
    if work["net"] == "prior":
        # Its DDIM loop runs timesteps - 1 net evaluations (the last pair ends at t = -1): ask for one more.
        cond = {"text_embed": text_embed, "text_encodings": text_enc}
        call = lambda: model.p_sample_loop((n, d), text_cond=cond, cond_scale=work["cond_scale"],  # noqa: E731
                                           timesteps=work["steps"] + 1)
    else:
        call = lambda: model.sample(image_embed=image_embed, text_encodings=text_enc,  # noqa: E731
                                    cond_scale=work["cond_scale"])
    counter = CallCounter(out_layer)  # once per net evaluation
    with torch.no_grad():
        return {"params": params, **run_sample(call, counter, work, args)}


# ---------------------------------------------------------------------- worker
def run_train(step, loss_fwd_bwd, zero_grad, work: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time the step; count one forward + backward's FLOPs afterwards (so the count's memory is not in the
    peak); `--fit-batch` runs only the first two steps, for memory."""
    if args.fit_batch:
        timing = time_train(step, 0, 2)
        return {"batch": work["batch"], **timing}
    timing = time_train(step, args.warmup, args.steps)
    flops = count_flops(loss_fwd_bwd)
    zero_grad(set_to_none=True)
    mean_s = statistics.fmean(timing["step_s"])
    samples_per_s = work["batch"] / mean_s
    return {"batch": work["batch"], **timing, "mean_step_s": mean_s, "samples_per_s": samples_per_s,
            "flops_per_sample": flops / work["batch"], "flops_per_s": samples_per_s * flops / work["batch"]}


def run_sample(call, counter: CallCounter, work: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time whole sampling calls; count one call's FLOPs and net evaluations afterwards."""
    import torch

    with torch.no_grad():
        timing = time_sample(call, args.sample_warmup, args.repeats)
        counter.calls = counter.rows = 0
        flops = count_flops(call)
    seconds = statistics.median(timing["call_s"])
    n = work["samples"]
    return {"samples": n, "steps": work["steps"], "cond_scale": work["cond_scale"], **timing, "seconds": seconds,
            "samples_per_s": n / seconds, "flops_per_sample": flops / n, "flops_per_s": flops / seconds,
            "net_calls": counter.calls, "net_rows": counter.rows}


def matmul_peak(args: argparse.Namespace, n: int = 2048) -> dict[str, Any]:
    """The machine's fp32 matmul rate at these threads: the best of several n x n x n products (2 n^3 FLOPs),
    a ceiling that no net's training or sampling reaches."""
    import torch

    from unclip.utils.machine import matmul_flops_per_s

    rate = matmul_flops_per_s(n, repeats=3 if args.smoke else 8)
    return {"n": n, "flops_per_s": rate, "threads": torch.get_num_threads()}


def worker_main(args: argparse.Namespace) -> None:
    """One measurement in this process; its record goes to --result as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.work == "matmul_peak":
        Path(args.result).write_text(json.dumps({"side": args.worker, "work": args.work, **matmul_peak(args)}))
        return
    works, shapes = (SMOKE_WORKS, SMOKE_SHAPES) if args.smoke else (WORKS, SHAPES)
    work = dict(works[args.work])
    if args.fit_batch:
        work["batch"] = args.fit_batch
    shape = shapes[work["net"]]
    fn = ours_work if args.worker == "ours" else peer_work
    record = {"side": args.worker, "work": args.work, "torch": torch.__version__, "threads": torch.get_num_threads(),
              **fn(work, shape, args)}
    Path(args.result).write_text(json.dumps(record))


# ---------------------------------------------------------------------- driver
def peer_python(args: argparse.Namespace) -> Path:
    return Path(args.peer_python) if args.peer_python else DEFAULT_PEER_VENV / "bin" / "python"


def peer_available(python: Path) -> str | None:
    """None when the peer's interpreter imports dalle2_pytorch, else why not."""
    if not python.exists():
        return f"no peer virtualenv at {python.parent.parent} (make it with --setup-peer)"
    r = subprocess.run([str(python), "-c", "import dalle2_pytorch"], capture_output=True, text=True)
    if r.returncode:
        return f"{python} cannot import dalle2_pytorch: {r.stderr.strip().splitlines()[-1:]}"
    return None


def setup_peer(venv: Path) -> None:
    """Make the peer's virtualenv from the package index; exits with a message if any step fails."""
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *PEER_TORCH, PEER_PACKAGE]]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"peer setup failed at: {' '.join(cmd)}\n(try: {venv}/bin/pip install --no-deps "
                             f"{PEER_PACKAGE}, then what `import dalle2_pytorch` asks for)")
    why = peer_available(venv / "bin" / "python")
    if why:
        raise SystemExit(f"peer setup finished but {why}")
    print(f"peer ready: {venv}", flush=True)


def run_worker(side: str, work: str, args: argparse.Namespace, fit_batch: int | None = None) -> dict[str, Any]:
    """One fresh worker subprocess; its record, or an error record."""
    python = sys.executable if side == "ours" else str(peer_python(args))
    result = Path(args.tmp_dir) / f"{side}-{work}-{os.getpid()}.json"
    result.unlink(missing_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--work", work, "--result", str(result),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--sample-warmup", str(args.sample_warmup), "--repeats", str(args.repeats)]
    cmd += ["--smoke"] * args.smoke + ["--compile"] * (args.compile and side == "ours")
    cmd += ["--no-channels-last"] * (not args.channels_last)
    if fit_batch:
        cmd += ["--fit-batch", str(fit_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
    wall = time.perf_counter() - t0
    if proc.returncode or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"side": side, "work": work, "error": f"worker exit {proc.returncode}: {' | '.join(tail)}"[:400],
                "worker_wall_s": wall, "fit_batch": fit_batch}
    record = json.loads(result.read_text())
    result.unlink()
    return {**record, "worker_wall_s": wall}


def fit_batches(side: str, work: str, args: argparse.Namespace, start: int) -> dict[str, Any]:
    """The largest start * 2^k (k >= 0, up to --fit-max) whose first two steps stay within the memory cap."""
    cap = args.mem_cap_gib * 2**30
    tried, best, batch = [], None, start
    while batch <= args.fit_max:
        r = run_worker(side, work, args, fit_batch=batch)
        peak = r.get("peak_rss_delta_bytes")
        tried.append({"batch": batch, "peak_rss_delta_bytes": peak, "error": r.get("error")})
        if peak is None or peak > cap:
            break
        best, batch = batch, batch * 2
    return {"cap_bytes": cap, "largest_batch": best, "tried": tried, "reached_fit_max": batch > args.fit_max}


def summarize(work: str, records: list[dict[str, Any]], fits: dict[str, Any]) -> dict[str, Any]:
    """Median over rounds per side, and ours / peer."""
    out: dict[str, Any] = {"work": work}
    for side in ("ours", "peer"):
        ok = [r for r in records if r["side"] == side and "error" not in r]
        if not ok:
            out[side] = None
            continue
        med = lambda key, ok=ok: statistics.median(r[key] for r in ok)  # noqa: E731
        out[side] = {"rounds": len(ok), "params": ok[0]["params"], "flops_per_sample": ok[0]["flops_per_sample"],
                     "samples_per_s": med("samples_per_s"), "samples_per_s_all": [r["samples_per_s"] for r in ok],
                     "flops_per_s": med("flops_per_s"), "peak_rss_delta_bytes": med("peak_rss_delta_bytes"),
                     "net_calls": ok[0].get("net_calls"), "net_rows": ok[0].get("net_rows"),
                     "largest_batch": (fits.get(side) or {}).get("largest_batch")}
    o, p = out["ours"], out["peer"]
    out["ratio"] = o["samples_per_s"] / p["samples_per_s"] if o and p else None
    out["flops_ratio"] = o["flops_per_sample"] / p["flops_per_sample"] if o and p else None
    out["params_ratio"] = o["params"] / p["params"] if o and p else None
    out["memory_ratio"] = (o["peak_rss_delta_bytes"] / p["peak_rss_delta_bytes"]
                           if o and p and p["peak_rss_delta_bytes"] else None)
    return out


def table(summaries: list[dict[str, Any]], peak: float | None = None) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import format_table

    header = ["work", "side", "params M", "GFLOP/sample", "samples/s", "GFLOP/s", "% matmul peak", "peak RSS MiB",
              "max batch", "ours/peer"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = []
    for s in summaries:
        for side in ("ours", "peer"):
            r = s[side]
            if r is None:
                rows.append([s["work"], side, "not measured", *[""] * (len(header) - 3)])
                continue
            rows.append([s["work"], side, fmt(r["params"] / 1e6, ".2f"), fmt(r["flops_per_sample"] / 1e9, ".3f"),
                         fmt(r["samples_per_s"], ".2f"), fmt(r["flops_per_s"] / 1e9, ".1f"),
                         fmt(100 * r["flops_per_s"] / peak if peak else None, ".0f"),
                         fmt(r["peak_rss_delta_bytes"] / 2**20, ".0f"), fmt(r["largest_batch"], "d"),
                         fmt(s["ratio"], ".2f") if side == "ours" else ""])
    return format_table(rows, header)


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive flock(2) on `lock` while the block runs (nothing without a path)."""
    if not lock:
        yield
        return
    import fcntl

    with open(lock, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 1:
            print(f"  (waited {waited:.0f} s for {lock})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--works", nargs="+", choices=list(WORKS), default=list(WORKS), help="what to measure")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (ours, peer) per work (3; --smoke 1)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per worker")
    p.add_argument("--warmup", type=int, default=2, help="training: untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="training: timed steps")
    p.add_argument("--sample-warmup", type=int, default=1, help="sampling: untimed calls first")
    p.add_argument("--repeats", type=int, default=1, help="sampling: timed calls per worker")
    p.add_argument("--compile", action="store_true", help="ours: net.compile() (inductor) before warm-up")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: channels_last UNet weights and images")
    p.add_argument("--fit", action="store_true", help="training works: also the largest batch within the cap")
    p.add_argument("--mem-cap-gib", type=float, default=2.0, help="--fit: peak RSS delta cap")
    p.add_argument("--fit-max", type=int, default=1024, help="--fit: largest batch tried")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round, 1 step: checks the plumbing")
    p.add_argument("--peer-python", default=None, help="the peer's interpreter (default .peer-venv/bin/python)")
    p.add_argument("--setup-peer", action="store_true", help="make .peer-venv from the package index and exit")
    p.add_argument("--no-peer", action="store_true", help="measure ours only")
    p.add_argument("--lock", default=None, help="flock this file around each work (e.g. /tmp/cpu.lock)")
    p.add_argument("--worker-timeout", type=float, default=900, help="seconds before a worker is killed")
    p.add_argument("--tmp-dir", default="/tmp", help="where workers write their records")
    p.add_argument("--out", default=None, help="JSON file for the records and the summary")
    # worker-only
    p.add_argument("--worker", choices=["ours", "peer"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", choices=[*WORKS, "matmul_peak"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fit-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and args.worker is None:
        args.warmup, args.steps, args.sample_warmup, args.repeats = 1, 1, 0, 1
        args.fit_max = min(args.fit_max, 8)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    if min(args.rounds, args.steps, args.repeats, args.threads) < 1 or min(args.warmup, args.sample_warmup) < 0:
        p.error("--rounds, --steps, --repeats and --threads must be >= 1; warm-ups >= 0")
    return args


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    if args.setup_peer:
        setup_peer(Path(args.peer_python).parent.parent if args.peer_python else DEFAULT_PEER_VENV)
        return {}
    peer_missing = "--no-peer given" if args.no_peer else peer_available(peer_python(args))
    if peer_missing:
        print(f"peer side skipped: {peer_missing}", flush=True)
    sides = ["ours"] if peer_missing else ["ours", "peer"]
    works, shapes = (SMOKE_WORKS, SMOKE_SHAPES) if args.smoke else (WORKS, SHAPES)
    doc: dict[str, Any] = {
        "benchmark": "side_by_side", "argv": sys.argv if argv is None else ["bench/side_by_side.py", *argv],
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": args.threads, "peer": PEER_PACKAGE, "peer_skipped": peer_missing, "smoke": args.smoke,
        "compile": args.compile, "shapes": shapes, "works": {w: works[w] for w in args.works},
        "records": [], "fits": {}, "summary": [],
    }
    start = time.perf_counter()
    with held(args.lock):
        peak = run_worker("ours", "matmul_peak", args)
    doc["matmul_peak_flops_per_s"] = peak.get("flops_per_s")
    print(f"fp32 matmul peak ({args.threads} threads, 2048^3): "
          f"{(peak.get('flops_per_s') or float('nan')) / 1e9:.0f} GFLOP/s", flush=True)
    for work in args.works:
        with held(args.lock):
            records = []
            for rnd in range(args.rounds):
                for side in sides:
                    r = {**run_worker(side, work, args), "round": rnd}
                    records.append(r)
                    doc["records"].append(r)
                    value = f"{r['samples_per_s']:.2f} samples/s" if "error" not in r else r["error"]
                    print(f"[{time.perf_counter() - start:6.0f} s] {work} round {rnd} {side}: {value}", flush=True)
                    write_json(args.out, doc)
            fits: dict[str, Any] = {}
            if args.fit and works[work]["kind"] == "train":
                for side in sides:
                    fits[side] = fit_batches(side, work, args, works[work]["batch"])
                    print(f"[{time.perf_counter() - start:6.0f} s] {work} {side}: largest batch within "
                          f"{args.mem_cap_gib:g} GiB: {fits[side]['largest_batch']}", flush=True)
                doc["fits"][work] = fits
        doc["summary"].append(summarize(work, records, fits))
        write_json(args.out, doc)
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads per worker, fp32, median of "
          f"{args.rounds} interleaved rounds; peer {PEER_PACKAGE}"
          + (f"; largest batch within {args.mem_cap_gib:g} GiB peak RSS delta (B * 2^k)" if args.fit else ""))
    print(table(doc["summary"], doc["matmul_peak_flops_per_s"]), flush=True)
    return doc


if __name__ == "__main__":
    main()
