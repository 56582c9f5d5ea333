"""Checkpoint files that are always complete: a kill at any moment leaves the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file in the target's folder, fsync, `os.replace`, fsync the folder.

    The rename is atomic on POSIX file systems, so a checkpoint path never holds a partial file, whatever
    kills the process (Lightning's own writer goes through a temporary file in the system temp folder and a
    move, which copies when the two are on different file systems and syncs nothing). Temporary files
    left by a killed save are removed by the next save of the same file. Remote paths (s3://, ...) use
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power loss
        finally:
            os.close(folder)
