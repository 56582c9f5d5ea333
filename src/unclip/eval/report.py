"""Evaluation reports: `eval.json` (for machines) and `eval.md` (a table for humans), written atomically."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from unclip.utils.atomic import atomic_write_text

_RESERVED = ("title", "created_utc", "metrics")


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become null (json.dumps would write NaN, which is not JSON)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_report(
    metrics: Mapping[str, float],
    out_dir: str | os.PathLike,
    title: str,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write `out_dir/eval.json` and `out_dir/eval.md`; returns their paths.

    Args:
        metrics: name -> value, e.g. `ImageMetrics.compute()`.
        out_dir: created if missing.
        title: heading of the markdown report (e.g. the checkpoint or run name).
        extra: metadata stored beside the metrics, e.g. `ImageMetrics.metadata()` plus `checkpoint` and
            `sampler`. Its `unavailable` mapping (name -> reason) is listed under the table; `num_real`,
            `num_fake` and other scalars/mappings under "Details".
    """
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra may not use the reserved keys {clash}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric_values = {k: float(v) for k, v in metrics.items()}
    record = {
        "title": title,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": metric_values,
        **extra,
    }
    json_path, md_path = out / "eval.json", out / "eval.md"
    atomic_write_text(json_path, json.dumps(_jsonable(record), indent=2, allow_nan=False) + "\n")

    lines = [f"# {title}", "", f"_{record['created_utc']}_", "", "| metric | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in metric_values.items()]
    unavailable = extra.pop("unavailable", None) or {}
    if unavailable:
        lines += ["", "**Unavailable**", ""]
        by_reason: dict[str, list[str]] = {}  # fid, kid and is usually share one reason: say it once
        for name, reason in unavailable.items():
            by_reason.setdefault(str(reason), []).append(f"`{name}`")
        lines += [f"- {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    if extra:
        lines += ["", "**Details**", ""]
        for key, value in extra.items():
            if isinstance(value, Mapping):
                lines.append(f"- {key}:")
                lines += [f"  - {k}: {_cell(v)}" for k, v in value.items()]
            else:
                lines.append(f"- {key}: {_cell(value)}")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
