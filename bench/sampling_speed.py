"""Sampling speed of the unCLIP stages on random conditioning: the peer's work, and our path per stage.

    python bench/sampling_speed.py --compile both --out sampling.json
    python bench/sampling_speed.py --device cpu --prior prior_tiny --decoder decoder_tiny \\
        --upsampler upsampler_tiny --lowres-size 16 --steps 2 --repeats 1

Rows (`--rows peer path`):
    peer   prior g=1, g=2   64 embeddings (one candidate each), 64 DDIM steps, guidance 1.0 and 2.0
           decoder g=3.5    16 images at the decoder's size, 64 DDIM steps, guidance 3.5
    path   "16 captions -> 256 px" with each stage's own sampler (conf/model/<stage>.yaml): prior (64 steps,
           2 candidates, best by text similarity), decoder (50 steps, guidance 3), upsampler (25 steps), and
           their sum
Each row calls what the pipeline calls, `unclip.generate.sample_image_embeds` / `sample_images` (guidance as one
batched forward through `guided_denoiser`, one seeded generator per sample), with random conditioning in place of
CLIP (text/image embeddings and caption tokens ~ N(0, 1), low-resolution images ~ U(-1, 1)), under bf16 autocast,
nets in eval mode (channels_last UNets on a GPU, as the pipeline) with their zero-initialised layers filled with
small random values (see `fill_zero_init`), optionally `net.compile()`.

Per row: seconds (median of --repeats runs after --warmup runs; the first run's time is reported too, it holds
torch.compile's compilation), images (or embeddings) per second, and the host syncs of one more run under
CUDA's sync debug mode with the source lines that synced, split into syncs per denoising step (from a second,
2-step run: e.g. a diffusers scheduler that syncs every step gives 1.0) and syncs once per call (set-up). The
table is printed last; --out holds the JSON records. The peer's figures are from shared/bench/PEER.md (its
decoder row is its 957M decoder, not our preset's shape).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in train_throughput.py

from train_throughput import (  # noqa: E402
    build_diffusion,
    build_net,
    count_host_syncs,
    environment,
    error_record,
    format_table,
    free_memory,
    param_count,
    setup_backends,
    stage_of,
    stage_settings,
    synchronize,
    write_json,
)

from unclip.diffusion.embed_norm import EmbedNormalizer  # noqa: E402
from unclip.generate import DECODER_DROP, SamplerConfig, sample_image_embeds, sample_images  # noqa: E402
from unclip.nets import UNet  # noqa: E402
from unclip.nets.unet import conv_memory_format  # noqa: E402

# The peer's eager bf16 seconds on one H100 (shared/bench/PEER.md), keyed by row and by our preset of its shape.
PEER_SAMPLING = {
    ("prior g=1", "prior_peer"): (1.94, "peer prior (101.8M), 64 embeddings, 64 DDIM steps"),
    ("prior g=2", "prior_peer"): (4.62, "peer prior (101.8M), 64 embeddings, 64 DDIM steps, guidance 2"),
    ("decoder g=3.5", "decoder_peer"): (11.7, "peer's 957M decoder_unet1 (ours at its small 186M shape)"),
}


class Stage:
    """A preset ready to sample: net (eval, on the device), diffusion and default sampler of its stage."""

    def __init__(self, preset: str, device: torch.device, channels_last: bool,
                 net: torch.nn.Module | None = None) -> None:
        """`net`: an already built net to use in place of conf/model/net/<preset>.yaml's."""
        self.preset = preset
        self.net = (build_net(preset) if net is None else net).to(device).eval().requires_grad_(False)
        fill_zero_init(self.net)
        self.name = stage_of(self.net)
        self.settings = stage_settings(self.name)
        self.diffusion = build_diffusion(self.settings).to(device)
        self.sampler = SamplerConfig.from_any(self.settings["sampler"])
        self.channels_last = channels_last and isinstance(self.net, UNet)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.params = param_count(self.net)
        self.device = device

    def with_sampler(self, steps: int | None = None, cond_scale: float | None = None) -> SamplerConfig:
        """The stage's sampler with the number of steps and the guidance scale overridden where given."""
        cfg = self.sampler.to_dict()
        if steps is not None:
            cfg["num_steps"] = steps
        if cond_scale is not None:
            cfg["cond_scale"] = cond_scale
        return SamplerConfig(**cfg)


def fill_zero_init(net: torch.nn.Module, std: float = 1e-3) -> None:
    """Give the zero-initialised tensors (final convs, residual outputs, attention projections, biases) small
    random values: an untrained net would otherwise multiply exact zeros, which a GPU can run faster than the
    non-zero weights of a trained one."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------- rows: one sampling call each
def prior_call(stage: Stage, captions: int, candidates: int, sampler: SamplerConfig) -> Callable[[], Any]:
    """Captions' random CLIP text encodings -> image embeddings (PriorSystem.sample without CLIP)."""
    cfg, g = stage.net.config, torch.Generator().manual_seed(1)
    text_embed = torch.randn(captions, cfg["embed_dim"], generator=g).to(stage.device)  # (B, D)
    tokens = torch.randn(captions, cfg["num_text_tokens"], cfg["text_token_dim"], generator=g).to(stage.device)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=stage.device)  # (B, L)
    normalizer = EmbedNormalizer(cfg["embed_dim"], stage.settings.get("embed_norm", "l2")).to(stage.device)
    seeds = list(range(captions))
    return lambda: sample_image_embeds(stage.net, stage.diffusion, normalizer, text_embed, tokens, mask, sampler,
                                       candidates, seeds=seeds)


def decoder_call(stage: Stage, images: int, sampler: SamplerConfig) -> Callable[[], Any]:
    """Random image embeddings (+ caption tokens) -> images (UnCLIPPipeline.decode without CLIP)."""
    cfg, g = stage.net.config, torch.Generator().manual_seed(2)
    embed = torch.randn(images, cfg["image_embed_dim"], generator=g)  # (B, D)
    cond: dict[str, Any] = {"image_embed": F.normalize(embed, dim=-1)}
    drops = DECODER_DROP[:1]
    if cfg.get("text_token_dim"):
        cond["text_tokens"] = torch.randn(images, 77, cfg["text_token_dim"], generator=g)  # (B, L, W)
        cond["text_mask"] = torch.ones(images, 77, dtype=torch.bool)  # (B, L)
        drops = DECODER_DROP
    cond = {k: v.to(stage.device) for k, v in cond.items()}
    shape = (images, cfg["out_channels"], cfg["image_size"], cfg["image_size"])
    seeds = list(range(images))
    return lambda: sample_images(stage.net, stage.diffusion, cond, shape, sampler, drops, seeds=seeds)


def upsampler_call(stage: Stage, images: int, lowres_size: int, sampler: SamplerConfig) -> Callable[[], Any]:
    """Random low-resolution images -> upsampled images (UnCLIPPipeline.upsample: the conditioning noised to
    the stage's sample_noise_level inside the call)."""
    cfg = stage.net.config
    g = torch.Generator().manual_seed(3)
    lowres = (torch.rand(images, cfg["in_channels"], lowres_size, lowres_size, generator=g) * 2 - 1).to(stage.device)
    shape = (images, cfg["out_channels"], cfg["image_size"], cfg["image_size"])
    seeds = list(range(images))
    level_value = int(stage.settings.get("sample_noise_level", 0))

    def call() -> torch.Tensor:
        cond: dict[str, Any] = {"lowres_image": lowres}
        if cfg["noise_level_cond"]:
            level = torch.full((images,), level_value, dtype=torch.long, device=stage.device)
            cond["lowres_image"] = stage.diffusion.q_sample(lowres, level, torch.randn_like(lowres))
            cond["noise_level"] = level
        return sample_images(stage.net, stage.diffusion, cond, shape, sampler, (), seeds=seeds)

    return call


def plan_rows(stages: dict[str, Stage], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows to time: name, stage, the call and its maker (sampler -> call), samples, net rows per step."""
    rows = []

    def add(group: str, name: str, stage: Stage, make: Callable[[SamplerConfig], Callable[[], Any]], samples: int,
            sampler: SamplerConfig, net_batch: int, **extra: Any) -> None:
        rows.append({"group": group, "name": name, "stage": stage, "make": make, "call": make(sampler),
                     "samples": samples, "sampler": sampler, "net_batch": net_batch, **extra})

    guided = lambda s: 2 if s.cond_scale != 1.0 else 1  # noqa: E731
    prior, decoder, upsampler = stages.get("prior"), stages.get("decoder"), stages.get("upsampler")
    if "peer" in args.rows:
        for scale in args.prior_guidance if prior else []:
            s = prior.with_sampler(args.steps or args.peer_steps, scale)
            add("peer", f"prior g={scale:g}", prior, partial(prior_call, prior, args.num_embeds, 1), args.num_embeds,
                s, guided(s) * args.num_embeds, candidates=1)
        if decoder:
            s, n = decoder.with_sampler(args.steps or args.peer_steps, args.decoder_guidance), args.num_images
            add("peer", f"decoder g={args.decoder_guidance:g}", decoder, partial(decoder_call, decoder, n), n, s,
                guided(s) * n)
    if "path" in args.rows:
        n = args.num_captions
        if prior:
            s, k = prior.with_sampler(args.steps), int(prior.settings.get("num_candidates", 2))
            add("path", "prior", prior, partial(prior_call, prior, n, k), n, s, guided(s) * n * k, candidates=k)
        if decoder:
            s = decoder.with_sampler(args.steps)
            add("path", "decoder", decoder, partial(decoder_call, decoder, n), n, s, guided(s) * n)
        if upsampler:
            s = upsampler.with_sampler(args.steps)
            lowres = args.lowres_size or (decoder.net.config["image_size"] if decoder else 64)
            add("path", "upsampler", upsampler, partial(upsampler_call, upsampler, n, lowres), n, s, guided(s) * n,
                lowres_size=lowres)
    return rows


# ---------------------------------------------------------------------- timing
def time_call(call: Callable[[], Any], warmup: int, repeats: int, device: torch.device,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
    """Wall seconds of whole sampling calls, synchronized at both ends (host overhead counts: it is real)."""

    def once() -> float:
        synchronize(device)
        start = time.perf_counter()
        with autocast():
            out = call()
        synchronize(device)
        seconds = time.perf_counter() - start
        if not torch.isfinite(out).all():
            raise FloatingPointError("sampling produced non-finite values")
        return seconds

    first = [once() for _ in range(warmup)]
    runs = [once() for _ in range(repeats)]
    return {"first_run_s": first[0] if first else None, "runs_s": runs, "seconds": statistics.median(runs)}


def run_row(row: dict[str, Any], compiled: bool, args: argparse.Namespace, device: torch.device,
            autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
    """Time one row, then count its host syncs; returns its record."""
    timing = time_call(row["call"], args.warmup, args.repeats, device, autocast)
    syncs = count_row_syncs(row, device, autocast) if args.sync_check else {}
    return record(row, compiled, timing, syncs)


def count_row_syncs(row: dict[str, Any], device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
    """Host syncs of one run under CUDA's sync debug mode, and of a 2-step run of the same call: the difference
    over the extra steps is the syncs per denoising step, the rest happen once per call (set-up, the end)."""

    def counted(call: Callable[[], Any]) -> tuple[int | None, dict[str, int]]:
        def run() -> Any:
            with autocast():
                return call()

        return count_host_syncs(run, device)

    syncs, sites = counted(row["call"])
    steps, per_step = row["sampler"].num_steps, None
    if syncs is not None and steps > 2:
        short = SamplerConfig(**{**row["sampler"].to_dict(), "num_steps": 2})
        short_syncs, _ = counted(row["make"](short))
        per_step = (syncs - short_syncs) / (steps - 2)
    return {"host_syncs": syncs, "host_syncs_per_step": per_step,
            "host_syncs_per_call": syncs - per_step * steps if per_step is not None else None, "sync_sites": sites}


def record(row: dict[str, Any], compiled: bool, timing: dict[str, Any], syncs: dict[str, Any]) -> dict[str, Any]:
    stage, sampler = row["stage"], row["sampler"]
    peer_s, peer_work = PEER_SAMPLING.get((row["name"], stage.preset), (None, None))
    if compiled:
        peer_s = peer_work = None  # the peer's sampling figures are eager
    steps = sampler.num_steps
    mode = "compiled" if compiled else "eager"
    return {
        "name": f"{row['group']} {row['name']} {stage.preset} {mode}", "group": row["group"], "row": row["name"],
        "stage": stage.name, "preset": stage.preset, "params": stage.params, "compile": compiled,
        "samples": row["samples"], "net_batch": row["net_batch"], "candidates": row.get("candidates"),
        "lowres_size": row.get("lowres_size"), "sampler": sampler.to_dict(), "steps": steps,
        "cond_scale": sampler.cond_scale, "channels_last": stage.channels_last,
        "image_size": stage.net.config.get("image_size"),
        **timing, "samples_per_s": row["samples"] / timing["seconds"],
        "ms_per_step": timing["seconds"] / steps * 1e3,
        "host_syncs": None, "host_syncs_per_step": None, "host_syncs_per_call": None, "sync_sites": {}, **syncs,
        "peer_s": peer_s, "peer_work": peer_work,
        "speedup_vs_peer": peer_s / timing["seconds"] if peer_s else None,
    }


def path_total(records: list[dict[str, Any]], compiled: bool) -> dict[str, Any] | None:
    """The full path's seconds: the sum of its stages' medians."""
    parts = [r for r in records if r.get("group") == "path" and r.get("compile") == compiled and "error" not in r]
    if not parts:
        return None
    seconds = sum(r["seconds"] for r in parts)
    samples = min(r["samples"] for r in parts)
    return {"name": f"path total {'compiled' if compiled else 'eager'}", "group": "path", "row": "total",
            "compile": compiled, "stages": [r["preset"] for r in parts], "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "host_syncs": sum(r["host_syncs"] or 0 for r in parts)
            if all(r["host_syncs"] is not None for r in parts) else None}


def table(records: list[dict[str, Any]]) -> str:
    header = ["row", "net rows", "steps", "guid.", "seconds", "img/s", "ms/step", "1st run s", "syncs", "syncs/step",
              "x peer"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["name"], r["error"][:60], *[""] * (len(header) - 2)])
            continue
        rows.append([r["name"], fmt(r.get("net_batch"), "d"), fmt(r.get("steps"), "d"), fmt(r.get("cond_scale"), "g"),
                     fmt(r["seconds"], ".3f"), fmt(r["samples_per_s"], ".1f"), fmt(r.get("ms_per_step"), ".1f"),
                     fmt(r.get("first_run_s"), ".1f"), fmt(r.get("host_syncs"), "d"),
                     fmt(r.get("host_syncs_per_step"), ".2f"), fmt(r.get("speedup_vs_peer"), ".2f")])
    return format_table(rows, header)


# ---------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="prior_peer", help="prior preset (conf/model/net), or none")
    p.add_argument("--decoder", default="decoder_peer", help="decoder preset, or none")
    p.add_argument("--upsampler", default="upsampler_shapes", help="upsampler preset, or none")
    p.add_argument("--rows", nargs="+", choices=["peer", "path"], default=["peer", "path"], help="which rows")
    p.add_argument("--num-embeds", type=int, default=64, help="peer prior rows: embeddings sampled")
    p.add_argument("--num-images", type=int, default=16, help="peer decoder row: images sampled")
    p.add_argument("--num-captions", type=int, default=16, help="path rows: captions (images) per stage")
    p.add_argument("--peer-steps", type=int, default=64, help="DDIM steps of the peer rows")
    p.add_argument("--prior-guidance", type=float, nargs="+", default=[1.0, 2.0], help="peer prior guidance scales")
    p.add_argument("--decoder-guidance", type=float, default=3.5, help="peer decoder guidance scale")
    p.add_argument("--steps", type=int, default=None, help="override every row's steps (smoke tests)")
    p.add_argument("--lowres-size", type=int, default=None, help="upsampler input size (default: decoder's size)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="net.compile() (both: eager rows first, then compiled)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for CPU tests)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last UNet weights (default: on a GPU only, as the project runs them)")
    p.add_argument("--sync-check", action=argparse.BooleanOptionalAction, default=True,
                   help="count host syncs per row (CUDA): one run, and a 2-step run for the per-step count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip rows that would start after this many seconds (fits a command limit)")
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if args.channels_last is None:
        args.channels_last = conv_memory_format(args.device) == torch.channels_last
    return args


def load_stages(args: argparse.Namespace, device: torch.device) -> dict[str, Stage]:
    stages = {}
    for expected in ("prior", "decoder", "upsampler"):
        preset = getattr(args, expected)
        if preset and preset.lower() != "none":
            stage = Stage(preset, device, args.channels_last)
            if stage.name != expected:
                raise SystemExit(f"--{expected} {preset}: that preset is a {stage.name}")
            stages[expected] = stage
    return stages


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    setup_backends()
    env = environment(device, sys.argv if argv is None else ["bench/sampling_speed.py", *argv])
    stages = load_stages(args, device)
    rows = plan_rows(stages, args)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")  # noqa: E731
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    start, records = time.perf_counter(), []
    for compiled in modes:
        if compiled:
            torch._dynamo.reset()
            for stage in stages.values():
                stage.net.compile(mode=args.compile_mode, backend=args.compile_backend, dynamic=False)
        for row in rows:
            name = f"{row['group']} {row['name']} {row['stage'].preset} {'compiled' if compiled else 'eager'}"
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                records.append({"name": name, "group": row["group"], "compile": compiled,
                                "error": "skipped: --budget-s"})
                continue
            try:
                records.append(run_row(row, compiled, args, device, autocast))
            except Exception as e:  # recorded; the other rows still run
                records.append(error_record(name, e, group=row["group"], compile=compiled))
                free_memory(device)
            print(f"[{time.perf_counter() - start:6.0f} s] {name}: {records[-1].get('seconds', float('nan')):.3f} s",
                  flush=True)
            write_json(args.out, env, records, "sampling_speed")
        total = path_total(records, compiled)
        if total:
            records.append(total)
            write_json(args.out, env, records, "sampling_speed")
    print(f"\n{env['device_name']}, torch {env['torch']}, {args.precision}, median of {args.repeats} runs after "
          f"{args.warmup} warm-up; img/s counts embeddings for prior rows; x peer = peer seconds / ours "
          "(shared/bench/PEER.md; its decoder is 957M)")
    print(table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
