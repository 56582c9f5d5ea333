"""Files that are always whole: a write goes to a temporary file beside the target and is renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text"]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` to `path` such that `path` holds the old file or the new one, whatever kills the process.

    Writes `.<name>.<pid>.tmp` in the same folder, fsyncs it, `os.replace`s it onto `path` (atomic on POSIX
    file systems) and fsyncs the folder, so the rename also survives a power loss. Temporary files a killed
    writer left behind are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file in the same folder, then rename it over `path`: no reader sees half a
    file (reports, records)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
