"""Training curves as PNG figures, from run folders' CSV logs (`logger=csv`).

    python -m unclip.plots outputs/demo                       every stage run under a folder
    python -m unclip.plots outputs/demo/prior outputs/demo/decoder --out figures/

For each run folder (one with `csv/version_*/metrics.csv`) the stage is read from its checkpoint metadata or
its folder name, and two figures are written to `<out>` (default: `<first folder>/plots`):

    loss.png     train/loss (raw and smoothed) and val/loss against the step, one panel per stage: the
                 seed study's loss curves of the prior and both UNets
    quality.png  the sample-quality curves each stage logs: FID and IS when they were computed (Inception
                 weights present), else FD on CLIP features and CLIP score; ShapesEval accuracy on `shapes`;
                 per stage its own figures (CLIP retrieval and zero-shot, prior cosines and retrieval,
                 upsampler PSNR against bicubic)

A metric that a run never logged is left out, so the figures show what was measured and nothing else.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["read_metrics", "find_runs", "plot_runs", "quality_panels", "QUALITY_KEYS"]

STAGE_ORDER = ("clip", "prior", "decoder", "upsampler")
# Per stage: (panel title, metric keys drawn in that panel). Only the keys a run logged are drawn.
QUALITY_KEYS: dict[str, list[tuple[str, list[str]]]] = {
    "clip": [("retrieval recall@1", ["val/t2i_r1", "val/i2t_r1"]),
             ("zero-shot accuracy", ["val/zeroshot_colour", "val/zeroshot_shape", "val/zeroshot_size",
                                     "val/zeroshot_position", "val/zeroshot_all"])],
    "prior": [("cosine with the true image embedding", ["val/prior_cosine", "val/text_cosine"]),
              ("retrieval top-1 (text embedding: the baseline)",
               ["val/prior_retrieval_top1", "val/text_retrieval_top1"])],
    "decoder": [("FID / FD-CLIP", ["val/fid", "val/fd_clip"]), ("IS / CLIP score", ["val/is_mean", "val/clip_score"]),
                ("ShapesEval", ["val/shapes_indist_all", "val/shapes_heldout_all", "val/shapes_indist_colour",
                                "val/shapes_indist_position", "val/shapes_indist_shape", "val/shapes_indist_size",
                                "val/shapes_indist_background", "val/shapes_acc_indist"]),
                # data-parallel ranks validate different splits and log only the keys every rank has: by scene
                ("ShapesEval, one object", [f"val/shapes_objects1_{a}" for a in
                                            ("colour", "position", "shape", "size", "count")]),
                ("ShapesEval, two objects", [f"val/shapes_objects2_{a}" for a in
                                             ("colour", "relation", "shape", "size", "count")]),
                ("cos(CLIP(sample), its image embedding)", ["val/recon_clip_cosine"])],
    "upsampler": [("PSNR (dB)", ["val/psnr", "val/psnr_bicubic"]), ("FID / FD-CLIP", ["val/fid", "val/fd_clip"]),
                  ("ShapesEval", ["val/shapes_indist_all", "val/shapes_acc_indist"])],
}


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of a run: key -> [(step, value)], from all its CSV versions (a resumed run
    continues in a new version), sorted by step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    if math.isfinite(number):
                        series.setdefault(key, []).append((int(float(step)), number))
    return {k: sorted(v) for k, v in series.items()}


def _stage_of(run_dir: Path) -> str:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        try:
            from unclip.checkpoint import load_stage_checkpoint

            return load_stage_checkpoint(ckpt)["unclip"]["stage"]
        except (ValueError, OSError):
            pass
    return next((s for s in STAGE_ORDER if s in run_dir.name), run_dir.name)


def find_runs(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(stage, run folder) for every run folder in or under `paths`, in pipeline order."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        found = [path] if (path / "csv").is_dir() else sorted(p.parent for p in path.glob("*/csv"))
        if not found:
            raise FileNotFoundError(f"{path} holds no run with CSV logs (train with logger=csv)")
        runs += found
    staged = [(_stage_of(run), run) for run in runs]
    return sorted(staged, key=lambda sr: (STAGE_ORDER.index(sr[0]) if sr[0] in STAGE_ORDER else 99, str(sr[1])))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def quality_panels(runs: list[tuple[str, Path]], metrics: dict[Path, dict]) -> list[tuple[str, Path, str, list[str]]]:
    """(stage, run, panel title, keys) of each quality panel with at least one key the run logged."""
    panels = [(stage, run, title, [k for k in keys if k in metrics[run]])
              for stage, run in runs for title, keys in QUALITY_KEYS.get(stage, [])]
    return [p for p in panels if p[3]]


def plot_runs(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png and quality.png for the runs in `paths`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = find_runs(paths)
    out = Path(out_dir) if out_dir else Path(paths[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {run: read_metrics(run) for _, run in runs}
    if not any(metrics.values()):
        raise FileNotFoundError(f"no metrics logged yet in {', '.join(str(r) for _, r in runs)} "
                                "(csv/version_*/metrics.csv has no numbers)")
    written = []

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (stage, run) in zip(axes[0], runs):
        m = metrics[run]
        if "train/loss" in m:
            steps, values = zip(*m["train/loss"])
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(list(values), max(1, len(values) // 20)), color="tab:blue", label="train/loss",
                    marker="o" if len(values) < 3 else None)  # a run of a step or two still shows its points
        if "val/loss" in m:
            steps, values = zip(*m["val/loss"])
            ax.plot(steps, values, "o-", color="tab:orange", label="val/loss")
        ax.set_title(f"{stage} ({run.name})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    panels = quality_panels(runs, metrics)
    if panels:
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, (stage, run, title, keys) in zip(axes.flat, panels):
            for key in keys:
                steps, values = zip(*metrics[run][key])
                ax.plot(steps, values, "o-", markersize=3, label=key.removeprefix("val/"))
            ax.set_title(f"{stage}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(out / "quality.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", default=None, help="output folder (default: <first run folder>/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out)
    except OSError as err:  # no such folder, no logs, --out an existing file
        raise SystemExit(f"plots: {err}") from None
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
