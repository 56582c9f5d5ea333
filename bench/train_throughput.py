"""Training-step throughput of the unCLIP denoisers on random inputs, on the same work as the public peer.

    python bench/train_throughput.py --preset prior_peer decoder_peer decoder_200m --batch 256 64 64 \\
        --compile both --out train.json
    python bench/train_throughput.py --device cpu --preset prior_tiny decoder_tiny --batch 4 --steps 2

One step is what a stage system's `training_step` plus Lightning's optimizer step do with a batch: the
conditioning and the classifier-free-guidance drop masks drawn as in `unclip.systems` (probabilities from
conf/model/<stage>.yaml), `GaussianDiffusion.training_losses` with the stage's prediction type and loss
weighting, backward, AdamW over `StageSystem.parameter_groups`; optionally (`--extras`) the system's gradient
clipping and the EMA callback's update. No data loading and no CLIP: the inputs are drawn once and stay on the
device (text/image embeddings ~ N(0, 1), caption tokens ~ N(0, 1) with every position valid, images ~ U(-1, 1)).
Precision as Lightning's bf16-mixed (autocast around the forward, fp32 weights and AdamW states), TF32 and
cuDNN benchmark on (conf/trainer/default.yaml), channels_last UNets on a GPU (NCHW on the CPU, as training runs
them).

Per configuration: samples/s, ms/step (mean over the timed steps; median and min too), peak memory of the timed
steps, parameters, FLOPs per sample of forward + backward (torch.utils.flop_counter on a meta-device copy:
matmul, conv and attention), MFU against --peak-flops, the first step's time (torch.compile's compilation
happens there), dynamo graph breaks, host syncs in one extra step (CUDA sync debug mode), and the ratio to the
peer's samples/s (shared/bench/PEER.md) where the peer timed the same preset at the same batch. The table is
printed last; --out holds one JSON record per configuration, rewritten after each so a killed run keeps its
results. Presets are built from conf/model/net/<preset>.yaml directly (no Hydra).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.nets import PriorTransformer, UNet
from unclip.nets.unet import conv_memory_format

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
H100_BF16_MATMUL_FLOPS = 798e12  # measured dense bf16 matmul rate of the H100 80GB (989e12 on paper)

# The peer's H100 samples/s (shared/bench/PEER.md), keyed by our preset of the same shape and the batch.
PEER_TRAIN = {
    ("prior_peer", 256): {"eager": 1540.0, "compiled": 4572.0, "params": 101_756_560, "flops": 49.75e9},
    ("decoder_peer", 64): {"eager": 325.0, "compiled": None, "params": 186_341_894, "flops": 203.49e9},
}


# ---------------------------------------------------------------------- presets and stages
def read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def build_net(preset: str, net_dir: Path = CONF / "model" / "net") -> nn.Module:
    """The net of conf/model/net/<preset>.yaml, built from its `_target_` (an `unclip.nets` class)."""
    path = net_dir / f"{preset}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in net_dir.glob("*.yaml"))
        raise SystemExit(f"no preset {preset!r} in {net_dir}; presets: {', '.join(names)}")
    cfg = read_yaml(path)
    module, _, name = cfg.pop("_target_").rpartition(".")
    if not module.startswith("unclip.nets"):
        raise SystemExit(f"{path}: _target_ must be an unclip.nets class, got {module}.{name}")
    return getattr(importlib.import_module(module), name)(**cfg)


def stage_of(net: nn.Module) -> str:
    """prior, decoder or upsampler: which stage (conf/model/<stage>.yaml) trains this net."""
    if isinstance(net, PriorTransformer):
        return "prior"
    if isinstance(net, UNet):
        return "upsampler" if net.config["lowres_cond"] else "decoder"
    raise TypeError(f"no stage trains a {type(net).__name__}")


def stage_settings(stage: str) -> dict[str, Any]:
    """The stage's Hydra config (diffusion, drop probabilities, optimizer, sampler) read as plain YAML."""
    return read_yaml(CONF / "model" / f"{stage}.yaml")


def build_diffusion(settings: dict[str, Any]) -> GaussianDiffusion:
    kwargs = {k: v for k, v in settings["diffusion"].items() if not k.startswith("_")}
    try:
        return GaussianDiffusion(**kwargs)
    except ImportError as e:  # the betas come from a diffusers scheduler
        raise SystemExit(f"{e}: GaussianDiffusion needs diffusers; on the GPU host install the carried .whl "
                         "first (bench/README.md)") from e


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------- inputs: drawn once, used every step
def random_data(net: nn.Module, stage: str, batch: int, device: torch.device, channels_last: bool,
                crop: int | None = None) -> dict[str, torch.Tensor]:
    """Random stand-ins for a batch after CLIP (the peer's distributions), already on `device`."""
    cfg = net.config
    g = torch.Generator().manual_seed(0)
    data: dict[str, torch.Tensor] = {}
    if stage == "prior":
        d, n, w = cfg["embed_dim"], cfg["num_text_tokens"], cfg["text_token_dim"]
        data["image_embed"] = torch.randn(batch, d, generator=g)  # (B, D)
        data["text_embed"] = torch.randn(batch, d, generator=g)  # (B, D)
    else:
        n, w = 77, cfg.get("text_token_dim")
        size = crop or cfg["image_size"]
        data["image"] = torch.rand(batch, cfg["in_channels"], size, size, generator=g) * 2 - 1  # (B, C, H, W)
        if cfg.get("image_embed_dim"):
            data["image_embed"] = torch.randn(batch, cfg["image_embed_dim"], generator=g)  # (B, D)
        if cfg["lowres_cond"]:  # already blurred, resized to the target size and cropped with the target
            data["lowres_image"] = torch.rand(batch, cfg["in_channels"], size, size, generator=g) * 2 - 1
    if w:
        data["text_tokens"] = torch.randn(batch, n, w, generator=g)  # (B, L, W), every position a real token
        data["text_mask"] = torch.ones(batch, n, dtype=torch.bool)  # (B, L)
    data = {k: v.to(device) for k, v in data.items()}
    if channels_last:
        data = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in data.items()}
    return data


def drop_mask(batch: int, prob: float, device: torch.device) -> torch.Tensor:
    """(B,) bool, True with probability `prob` (StageSystem.drop_mask)."""
    return torch.rand(batch, device=device) < prob


def step_inputs(stage: str, net_config: dict[str, Any], data: dict[str, torch.Tensor], settings: dict[str, Any],
                diffusion: GaussianDiffusion, normalizer: EmbedNormalizer | None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x_0, net conditioning) of one training step, as the stage system's `training_step` forms them."""
    if stage == "prior":  # PriorSystem.conditioning + training_step
        x0 = normalizer.encode(data["image_embed"])  # (B, D) in the prior's space
        b = x0.shape[0]
        cond = {"text_embed": F.normalize(data["text_embed"], dim=-1), "text_tokens": data["text_tokens"],
                "text_mask": data["text_mask"], "cond_drop_mask": drop_mask(b, settings["cond_drop_prob"], x0.device)}
        return x0, cond
    x0 = data["image"]
    b, device = x0.shape[0], x0.device
    if stage == "decoder":  # DecoderSystem.training_inputs(train=True)
        cond = {"image_embed": F.normalize(data["image_embed"], dim=-1),
                "image_embed_drop_mask": drop_mask(b, settings["image_drop_prob"], device)}
        if "text_tokens" in data:
            cond.update(text_tokens=data["text_tokens"], text_mask=data["text_mask"],
                        text_drop_mask=drop_mask(b, settings["text_drop_prob"], device))
        return x0, cond
    cond = {"lowres_image": data["lowres_image"]}  # UpsamplerSystem.lowres_cond, noise level 0 (its default)
    if net_config["noise_level_cond"]:
        level = torch.zeros(b, dtype=torch.long, device=device)
        cond["lowres_image"] = diffusion.q_sample(data["lowres_image"], level, torch.randn_like(data["lowres_image"]))
        cond["noise_level"] = level
    return x0, cond


# ---------------------------------------------------------------------- the step
def make_optimizer(net: nn.Module, settings: dict[str, Any], kind: str) -> torch.optim.Optimizer:
    """AdamW with the stage's hyperparameters over StageSystem's parameter groups; `kind`: fused or foreach."""
    from unclip.systems.base import StageSystem

    opt = {k: v for k, v in settings["optimizer"].items() if not k.startswith("_") and k != "fused"}
    groups = StageSystem.parameter_groups(net, opt.get("weight_decay", 0.0))  # reads only named_parameters()
    return torch.optim.AdamW(groups, **opt, fused=kind == "fused", foreach=kind == "foreach")


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """StageSystem.configure_gradient_clipping without logging: global-norm clipping, and a non-finite norm
    handed to the fused AdamW as `found_inf` (it then skips the update on the device)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(norm)).float()


def make_step(net: nn.Module, diffusion: GaussianDiffusion, inputs: Callable[[], tuple], optimizer,
              autocast: Callable[[], contextlib.AbstractContextManager], clip_norm: float | None,
              ema: nn.Module | None) -> Callable[[], torch.Tensor]:
    """One training step; returns the loss tensor (never read inside the timed loop)."""

    def step() -> torch.Tensor:
        with autocast():
            x0, cond = inputs()
            loss = diffusion.training_losses(net, x0, **cond)["loss"].mean()
        loss.backward()
        if clip_norm is not None:
            clip_gradients(optimizer, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(net)
        return loss.detach()

    return step


def make_ema(net: nn.Module) -> nn.Module:
    """The EMA callback's averaged copy (decay and warm-up from conf/callbacks/default.yaml)."""
    from unclip.callbacks import _EMAModel

    cfg = read_yaml(CONF / "callbacks" / "default.yaml")["ema"]
    return _EMAModel(net, decay=cfg.get("decay", 0.9999), warmup=cfg.get("warmup", True))


# ---------------------------------------------------------------------- measurements
def count_flops(net: nn.Module, x0: torch.Tensor, cond: dict[str, Any]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of the net on these inputs, on a meta-device copy (no memory, no
    time); gradient checkpointing off so recomputation is not counted as model FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(net.config)
    if "gradient_checkpointing" in config:
        config["gradient_checkpointing"] = False
    with torch.device("meta"):
        meta_net = type(net)(**config).train()

    def meta(v: Any) -> Any:
        return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v

    t = torch.zeros(x0.shape[0], dtype=torch.long, device="meta")
    args = (meta(x0), t)
    kwargs = {k: meta(v) for k, v in cond.items()}
    with FlopCounterMode(display=False) as fwd:
        meta_net(*args, **kwargs)
    with FlopCounterMode(display=False) as total:
        meta_net(*args, **kwargs).float().sum().backward()
    return fwd.get_total_flops(), total.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Warm-up steps (the first timed alone: it compiles), then `steps` steps timed with CUDA events recorded
    between steps and read once at the end, so nothing waits on the GPU inside the timed loop."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            loss = step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        step_ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
    return {"first_step_s": first_step_s, "warmup_steps": warmup, "step_ms": step_ms, "loss": float(loss)}


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, dict[str, int]]:
    """Host syncs while `fn` runs, by CUDA's sync debug mode (a warning per synchronizing call), with the
    count per source line; (None, {}) off CUDA."""
    if device.type != "cuda":
        return None, {}
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), dict(sites.most_common(8))


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def free_memory(device: torch.device) -> None:
    """Release what the last configuration left (reference cycles too) so peak memory starts afresh."""
    if device.type == "cuda":  # memory is only measured on CUDA; a collection costs ~0.3 s
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """What the numbers were measured on, and the exact command."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"argv": argv, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(device), "device_name": name, "host": platform.node()}


def setup_backends() -> None:
    """TF32 for fp32 matmuls and convolutions, cuDNN autotuning (the trainer's `benchmark: true`)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def write_json(path: str | None, env: dict[str, Any], records: list[dict[str, Any]], kind: str) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"benchmark": kind, **env, "records": records}, indent=2))
    tmp.replace(path)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---------------------------------------------------------------------- one preset, several configurations
class Bench:
    """One preset at one batch size on the device: the net, its diffusion, the inputs, and the FLOP count."""

    def __init__(self, preset: str, batch: int, device: torch.device, channels_last: bool, crop: int | None):
        self.preset, self.batch, self.device = preset, batch, device
        self.net = build_net(preset)
        self.stage = stage_of(self.net)
        self.settings = stage_settings(self.stage)
        self.diffusion = build_diffusion(self.settings).to(device)
        self.channels_last = channels_last and isinstance(self.net, UNet)
        self.net.to(device).train()
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.stage == "upsampler":
            crop = crop or self.net.config["image_size"] // 4  # UpsamplerSystem's default train_crop_size
        self.crop = crop if self.stage == "upsampler" else None
        self.data = random_data(self.net, self.stage, batch, device, self.channels_last, self.crop)
        embed_dim = self.net.config.get("embed_dim")
        self.normalizer = EmbedNormalizer(embed_dim, self.settings.get("embed_norm", "l2")).to(device) \
            if self.stage == "prior" else None
        x0, cond = self.inputs()
        self.flops_fwd, self.flops = count_flops(self.net, x0, cond)
        self.params = param_count(self.net)
        self.compiled = False

    def inputs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return step_inputs(self.stage, self.net.config, self.data, self.settings, self.diffusion, self.normalizer)

    def compile(self, mode: str | None, backend: str) -> None:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self.net.compile(mode=mode, backend=backend, dynamic=False)
        self.compiled = True

    def run(self, optim: str, ema: bool, clip_norm: float | None, args: argparse.Namespace) -> dict[str, Any]:
        """Time one configuration; returns its record."""
        free_memory(self.device)
        optimizer = make_optimizer(self.net, self.settings, optim)
        ema_model = make_ema(self.net) if ema else None
        precision = args.precision
        autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        step = make_step(self.net, self.diffusion, self.inputs, optimizer, autocast, clip_norm, ema_model)
        timing = time_steps(step, args.warmup, args.steps, self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        syncs, sites = count_host_syncs(step, self.device)
        return self.record(optim, ema, clip_norm, precision, timing, peak, syncs, sites, args.peak_flops)

    def record(self, optim, ema, clip_norm, precision, timing, peak, syncs, sites, peak_flops) -> dict[str, Any]:
        ms = timing["step_ms"]
        mean_ms = statistics.fmean(ms)
        samples_per_s = self.batch / (mean_ms / 1e3)
        mode = "compiled" if self.compiled else "eager"
        peer = PEER_TRAIN.get((self.preset, self.batch), {})
        peer_rate = peer.get(mode)
        extras = "+ema" if ema else ""
        extras += "+clip" if clip_norm is not None else ""
        return {
            "name": f"{self.preset} B={self.batch} {mode} {optim}{extras}",
            "preset": self.preset, "stage": self.stage, "net": type(self.net).__name__,
            "net_config": self.net.config, "batch": self.batch, "crop": self.crop,
            "compile": self.compiled, "optimizer": f"AdamW({optim})", "ema": ema, "clip_norm": clip_norm,
            "precision": precision, "channels_last": self.channels_last,
            "params": self.params, "flops_per_sample_fwd": self.flops_fwd / self.batch,
            "flops_per_sample_fwd_bwd": self.flops / self.batch,
            "warmup_steps": timing["warmup_steps"], "timed_steps": len(ms),
            "first_step_s": timing["first_step_s"], "ms_per_step": mean_ms,
            "ms_per_step_median": statistics.median(ms), "ms_per_step_min": min(ms),
            "samples_per_s": samples_per_s, "achieved_flops": samples_per_s * self.flops / self.batch,
            "peak_flops": peak_flops, "mfu": samples_per_s * self.flops / self.batch / peak_flops,
            "peak_memory_bytes": peak, "peak_memory_gib": peak / 2**30 if peak is not None else None,
            **(dynamo_counts() if self.compiled else {"graph_breaks": None, "graphs": None}),
            "host_syncs_per_step": syncs, "sync_sites": sites, "final_loss": timing["loss"],
            "loss_finite": math.isfinite(timing["loss"]),
            "peer_samples_per_s": peer_rate, "ratio_to_peer": samples_per_s / peer_rate if peer_rate else None,
            "peer_params": peer.get("params"), "peer_flops_per_sample_fwd_bwd": peer.get("flops"),
        }


# ---------------------------------------------------------------------- driver
def configurations(args: argparse.Namespace) -> list[tuple[str, bool, float | None]]:
    """(optimizer, ema, clip_norm) for every combination of --optim and --extras."""
    out = []
    for optim, extra in itertools.product(args.optim, args.extras):
        parts = set(extra.split("+")) - {"none"}
        unknown = parts - {"ema", "clip"}
        if unknown:
            raise SystemExit(f"--extras: unknown {sorted(unknown)}; use none, ema, clip or ema+clip")
        out.append((optim, "ema" in parts, args.clip_norm if "clip" in parts else None))
    return out


def table(records: list[dict[str, Any]]) -> str:
    header = ["configuration", "params M", "GFLOP/sample", "samples/s", "ms/step", "MFU %", "peak GiB",
              "1st step s", "graph brk", "syncs", "x peer"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["name"], r["error"][:60], *[""] * (len(header) - 2)])
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)
        rows.append([r["name"], fmt(r["params"] / 1e6, ".1f"), fmt(r["flops_per_sample_fwd_bwd"] / 1e9, ".2f"),
                     fmt(r["samples_per_s"], ".1f"), fmt(r["ms_per_step"], ".2f"), fmt(100 * r["mfu"], ".1f"),
                     fmt(r["peak_memory_gib"], ".2f"), fmt(r["first_step_s"], ".1f"), fmt(r["graph_breaks"], "d"),
                     fmt(r["host_syncs_per_step"], "d"), fmt(r["ratio_to_peer"], ".2f")])
    return format_table(rows, header)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["prior_peer", "decoder_peer"],
                   help="net presets (conf/model/net/<name>.yaml)")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 64],
                   help="batch size: one for all presets, or one per preset")
    p.add_argument("--steps", type=int, default=30, help="timed steps (the peer: 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first, at least 1 (the peer: 10)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="net.compile() (both: eager configurations first, then compiled)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for CPU tests)")
    p.add_argument("--optim", nargs="+", choices=["fused", "foreach"], default=["fused", "foreach"],
                   help="AdamW implementations to time")
    p.add_argument("--extras", nargs="+", default=["none"],
                   help="per configuration: none, ema, clip or ema+clip (EMA update / gradient clipping)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="max gradient norm with 'clip' (trainer default)")
    p.add_argument("--crop", type=int, default=None, help="upsampler training crop (default: image_size // 4)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last UNet weights and images (default: on a GPU only, as the project runs them)")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_MATMUL_FLOPS, help="FLOP/s that MFU divides by")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip configurations that would start after this many seconds (fits a command limit)")
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args(argv)
    if len(args.batch) not in (1, len(args.preset)):
        p.error(f"--batch takes one value or one per preset ({len(args.preset)})")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.channels_last is None:
        args.channels_last = conv_memory_format(args.device) == torch.channels_last
    return args


def error_record(name: str, error: BaseException, **fields: Any) -> dict[str, Any]:
    """A configuration that failed (out of memory, a compile error): recorded, and the run goes on."""
    traceback.print_exception(error, file=sys.stderr)
    kind = "OOM" if isinstance(error, torch.cuda.OutOfMemoryError) else type(error).__name__
    return {"name": name, **fields, "error": f"{kind}: {error}"[:300]}


def run_preset(preset: str, batch: int, modes: list[bool], configs: list[tuple], args: argparse.Namespace,
               device: torch.device, start: float, records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Every configuration of one preset (eager ones first, then compiled), appended to `records`."""
    bench = None
    try:
        bench = Bench(preset, batch, device, args.channels_last, args.crop)
    except Exception as e:  # a preset that cannot even be built is reported, not fatal
        records.append(error_record(f"{preset} B={batch}", e, preset=preset, batch=batch))
    for compiled, (optim, ema, clip_norm) in itertools.product(modes, configs if bench else []):
        extras = "+ema" * ema + "+clip" * (clip_norm is not None)
        name = f"{preset} B={batch} {'compiled' if compiled else 'eager'} {optim}{extras}"
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            records.append({"name": name, "preset": preset, "batch": batch, "error": "skipped: --budget-s"})
            continue
        try:
            if compiled and not bench.compiled:
                bench.compile(args.compile_mode, args.compile_backend)
            records.append(bench.run(optim, ema, clip_norm, args))
        except Exception as e:
            records.append(error_record(name, e, preset=preset, batch=batch, compile=compiled))
            free_memory(device)
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: "
              f"{records[-1].get('samples_per_s', float('nan')):.1f} samples/s", flush=True)
        write_json(args.out, env, records, "train_throughput")
    del bench
    torch._dynamo.reset()
    free_memory(device)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    setup_backends()
    env = environment(device, sys.argv if argv is None else ["bench/train_throughput.py", *argv])
    env["peak_flops"] = args.peak_flops
    batches = args.batch * len(args.preset) if len(args.batch) == 1 else args.batch
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    configs = configurations(args)
    start, records = time.perf_counter(), []
    for preset, batch in zip(args.preset, batches):
        run_preset(preset, batch, modes, configs, args, device, start, records, env)
    print(f"\n{env['device_name']}, torch {env['torch']}, {args.precision}, {args.warmup} warm-up + {args.steps} "
          f"timed steps, MFU vs {args.peak_flops / 1e12:.0f} TFLOP/s; peer: shared/bench/PEER.md")
    print(table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
