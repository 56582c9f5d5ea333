"""A callback for the resume tests: appends each training step's sample keys to a file as it starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class KeyLog(pl.Callback):
    """Writes "start <step>" when fit starts and "<step> <key> <key> ..." before every training step (flushed,
    so a killed run's log is complete up to its last step); sleeps `sleep_s` after each step (slow runs)."""

    def __init__(self, path: str, sleep_s: float = 0.0) -> None:
        self.path, self.sleep_s = Path(path), sleep_s

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(f"start {trainer.global_step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(f"{trainer.global_step + 1} {' '.join(batch['key'])}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)


def read_keylog(path: Path) -> tuple[list[int], dict[int, str]]:
    """(the steps each launch started at, step -> keys of that step's batch as last written)."""
    starts, steps = [], {}
    for line in Path(path).read_text().splitlines():
        head, _, rest = line.partition(" ")
        if head == "start":
            starts.append(int(rest))
        else:
            steps[int(head)] = rest
    return starts, steps
