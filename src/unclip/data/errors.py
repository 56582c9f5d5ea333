"""Skip-and-count error handling for the WebDataset pipeline.

A bad input (corrupt image, missing caption, truncated tar, unreadable shard, oversized image, ...) must
never stop a run and must never be silent. Every pipeline stage reports it to one `SkipCounter` per
pipeline copy (so one per DataLoader worker): the sample is dropped, the reason is counted, and a
rate-limited warning is logged. The counter's cumulative totals travel to the main process inside the
batches (see `WebDataModule.on_before_batch_transfer`).

`webdataset.warn_and_continue` is not used on purpose: it sleeps 0.5 s per error, which starves the
training loop on a dataset with a few percent of bad samples.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
import uuid
import zlib

log = logging.getLogger(__name__)

# Reasons that mean "a whole shard failed", as opposed to one sample.
SHARD_REASONS = frozenset({"unreadable_shard", "truncated_tar", "corrupt_tar"})
# This many shard failures in a row with no good sample in between means the source is unusable
# (wrong URL, expired credentials): fail loudly rather than spin forever on a resampled stream.
MAX_CONSECUTIVE_SHARD_ERRORS = 1000


class SkipSample(Exception):
    """Raised by decoding code to drop one sample; `reason` is the counter key (e.g. "corrupt_image")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def classify(exn: BaseException) -> str:
    """Map an exception raised anywhere in the pipeline to a short, stable reason string."""
    if isinstance(exn, SkipSample):
        return exn.reason
    message = " ".join(str(a) for a in exn.args[:1])
    if isinstance(exn, tarfile.ReadError) and "empty file" in message:
        return "unreadable_shard"  # nothing came: an empty file, or a `pipe:` command that failed
    if isinstance(exn, EOFError) or (isinstance(exn, tarfile.ReadError) and "end of data" in message):
        return "truncated_tar"
    if isinstance(exn, (tarfile.TarError, zlib.error)):
        return "corrupt_tar"
    if isinstance(exn, ValueError) and "duplicate file name" in message:
        return "duplicate_member"
    if isinstance(exn, OSError) or (isinstance(exn, ValueError) and "gopen" in message):
        # A local file that cannot be opened, a failing `pipe:` command, an unknown URL scheme.
        return "unreadable_shard"
    return f"error_{type(exn).__name__}"


def _inner_source(exn: BaseException) -> str | None:
    """The stream named by webdataset's member-read annotation ("<message> @ <stream>"), if any."""
    if len(exn.args) == 1 and isinstance(exn.args[0], str) and " @ " in exn.args[0]:
        return exn.args[0].rsplit(" @ ", 1)[1]
    return None


def _outer_source(exn: BaseException) -> str | None:
    """The stream named by webdataset's tar-iterator annotation (args extended with (stream, url))."""
    if len(exn.args) >= 3 and isinstance(exn.args[-1], str):
        return str(exn.args[-2])
    return None


class SkipCounter:
    """Counts skipped samples by reason and logs rate-limited warnings. One instance per process.

    The counter resets itself when it finds it has been copied into a new process (a freshly started
    DataLoader worker), and carries a `source` id that is unique per process lifetime, so the main
    process can keep "latest cumulative counts per source" and sum them without double counting.
    """

    def __init__(self, split: str, log_first: int = 3, log_interval_s: float = 60.0) -> None:
        self.split = split
        self.log_first = log_first
        self.log_interval_s = log_interval_s
        self._pid = -1
        self.muted = False  # set while a resumed stream re-reads samples whose skips were counted before
        self._ensure_process()

    def _ensure_process(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self.source = f"{self._pid}-{uuid.uuid4().hex[:8]}"
        self.counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._pending_inner: str | None = None
        self._shard_errors_in_a_row = 0

    def skip(self, reason: str, detail: str = "") -> None:
        """Count one dropped sample (or shard) and maybe log it."""
        self._ensure_process()
        if self.muted:
            return
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        now = time.monotonic()
        if count <= self.log_first or now - self._last_log.get(reason, -1e9) >= self.log_interval_s:
            self._last_log[reason] = now
            log.warning("data/%s: skipped (%s, %d so far): %s", self.split, reason, count, detail[:300])
        if reason in SHARD_REASONS:
            self._shard_errors_in_a_row += 1
            if self._shard_errors_in_a_row >= MAX_CONSECUTIVE_SHARD_ERRORS:
                raise RuntimeError(
                    f"data/{self.split}: {self._shard_errors_in_a_row} shards in a row failed to read and no "
                    f"sample came through (last: {detail[:300]}); check the shard URLs, the network or the "
                    f"credentials. Counts so far: {self.counts}"
                )

    def good(self) -> None:
        """Note that a sample decoded fine (resets the consecutive shard-failure guard)."""
        self._shard_errors_in_a_row = 0

    def handle(self, exn: BaseException) -> bool:
        """webdataset handler: count the exception, log it (rate-limited), keep going (return True)."""
        self._ensure_process()
        reason = classify(exn)
        if reason in SHARD_REASONS:
            # webdataset 1.0.2 reports one truncated tar twice: first from the member read (message
            # suffixed " @ <stream>"), then from the tar iterator (args extended with (stream, url)).
            pending, self._pending_inner = self._pending_inner, _inner_source(exn)
            if pending is not None and pending == _outer_source(exn):
                return True
        message = exn.detail if isinstance(exn, SkipSample) else f"{type(exn).__name__}: {exn}"
        where = getattr(exn, "sample_ref", None)  # set by the decode stage: "<key> in <shard>"
        self.skip(reason, f"{where}: {message}" if where else message)
        return True

    def snapshot(self) -> dict:
        """Cumulative totals of this process, as carried in a batch's `data_stats` entry."""
        self._ensure_process()
        return {"split": self.split, "source": self.source, "skipped": dict(self.counts)}
