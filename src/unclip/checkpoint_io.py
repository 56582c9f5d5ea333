"""Checkpoint files that are always complete: a kill at any moment leaves the old file or the new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
from pytorch_lightning.plugins.io import TorchCheckpointIO

from unclip.utils.atomic import atomic_torch_save

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local files written by `unclip.utils.atomic.atomic_torch_save`.

    Lightning's own writer goes through a temporary file in the system's temp folder and a move, which
    copies in place when the two are on different file systems (a kill mid-copy leaves a partial
    `last.ckpt`) and syncs nothing. Remote paths (s3://, ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
