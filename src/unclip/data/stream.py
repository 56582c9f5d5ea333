"""The training stream: a pure function of its position, so a resumed run sees what an uninterrupted one would.

Each rank's stream is split into *lanes*, one per DataLoader worker (one with num_workers=0). A lane is a
sequence of *segments*; a segment is `shards_per_segment` shards read interleaved and shuffled through a
buffer of `shuffle_buffer` samples that is emptied at the segment's end, with a generator seeded per segment:

    resampled  segment j of lane l on rank r: shards drawn with replacement from (seed, r, l, j)
    finite     epoch e: all shards in a seeded order of (seed, e), every world_size-th one to a rank, every
               num_lanes-th of those to a lane, cut into segments; past the last one the lane's epoch is over

A lane's position is (epoch, segment, offset): the raw samples it has produced so far are exactly the first
`offset` of that segment after those of the earlier segments. Resuming a lane re-reads the segment's shards
and drops `offset` raw samples undecoded (their skip counts were counted before); nothing else is replayed.
Per-sample randomness (crops, flips, templates) is seeded from the sample's position too.

The main process is the source of truth. Every batch names its lane and the lane's position after its last
raw sample (in `data_stats`); `StreamState` records it when the batch is *consumed*, so batches prefetched
but never trained on come again after a resume. Before each DataLoader epoch the main process writes a
`Plan` into shared memory: for each worker, the lane it serves, where that lane stands and (resampled) how
many batches it still owes this epoch. After a resume that lands mid-epoch the lanes are rotated over the
workers so that the DataLoader's round-robin, which always starts at worker 0, delivers batches in the
uninterrupted order. Within an epoch a worker keeps its lane's reader open across DataLoader epochs, so the
re-read cost is paid only on a resume (and once after a rotation).

webdataset 1.0.2 has no resumable stream state of its own; its tar reading, shuffle and batching are used.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from unclip.data.errors import SkipCounter
from unclip.data.stages import Cursor, KeepMembers, seeded_rng, worker_info

log = logging.getLogger(__name__)

__all__ = ["Cursor", "LaneSource", "Plan", "StreamLoader", "StreamState", "TakePlanned", "drawn_shards",
           "lane_shards"]

def lane_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int, lane: int,
                num_lanes: int) -> list[str]:
    """Finite stream: the shards one lane of one rank reads in `epoch`, in order."""
    order = list(urls)
    seeded_rng("shards", seed, epoch).shuffle(order)
    return order[rank::world_size][lane::num_lanes]


def drawn_shards(urls: list[str], seed: int, salt: int, rank: int, lane: int, epoch: int, segment: int,
                 count: int) -> list[str]:
    """Resampled stream: the `count` shards of one segment, drawn with replacement (`epoch` stays 0 in a run;
    see StreamState.begin_epoch)."""
    rng = seeded_rng("draw", seed, salt, rank, lane, epoch, segment)
    return [rng.choice(urls) for _ in range(count)]


def interleave(streams: list[Iterator[dict]]) -> Iterator[dict]:
    """One sample from each stream in turn until all are exhausted."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


class Plan:
    """Per worker, what it serves this DataLoader epoch: (lane, epoch, segment, offset, quota, salt); quota < 0
    means "until the lane's epoch ends". Written by the main process, read by the workers (shared memory)."""

    COLUMNS = 6

    def __init__(self, num_workers: int) -> None:
        self.rows = torch.zeros(max(1, num_workers), self.COLUMNS, dtype=torch.int64).share_memory_()

    def write(self, rows: list[list[int]]) -> None:
        self.rows.copy_(torch.tensor(rows, dtype=torch.int64))

    def row(self, worker: int) -> list[int]:
        return [int(v) for v in self.rows[worker].tolist()]


class LaneSource(IterableDataset):
    """Stage 0 of the training pipeline: the raw samples (members filtered by `keep`) of the lane this worker
    serves, from the position the plan gives. See the module docstring."""

    def __init__(self, urls: list[str], seed: int, rank: int, world_size: int, num_lanes: int, resampled: bool,
                 shards_per_segment: int, shuffle_buffer: int, keep: KeepMembers, counter: SkipCounter,
                 plan: Plan, cursor: Cursor) -> None:
        self.urls, self.seed, self.rank, self.world_size = urls, seed, rank, world_size
        self.num_lanes, self.resampled = num_lanes, resampled
        self.shards_per_segment, self.shuffle_buffer = shards_per_segment, shuffle_buffer
        self.keep, self.counter, self.plan, self.cursor = keep, counter, plan, cursor
        self._live: tuple[tuple, Iterator[dict]] | None = None  # (lane, salt) and the open reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}  # an open reader stays in its process

    def __iter__(self) -> Iterator[dict]:
        lane, epoch, segment, offset, _, salt = self.plan.row(worker_info()[0])
        live = self._live
        if live is None or live[0] != (lane, salt) or self.cursor.position != (epoch, segment, offset):
            self.cursor.lane, self.cursor.position = lane, (epoch, segment, offset)
            live = self._live = ((lane, salt), self._lane(lane, epoch, segment, offset, salt))
        return _borrow(live[1])

    def _lane(self, lane: int, epoch: int, segment: int, offset: int, salt: int) -> Iterator[dict]:
        while shards := self._shards(lane, epoch, segment, salt):
            rng = seeded_rng("shuffle", self.seed, salt, self.rank, lane, epoch, segment)
            self.counter.muted = offset > 0  # re-reading what the interrupted run had already counted
            for k, raw in enumerate(self._segment(shards, rng), start=1):
                if k <= offset:
                    self.counter.muted = k < offset
                    continue
                self.cursor.position = (epoch, segment, k)
                raw["__seed__"] = f"{self.seed}/{salt}/{self.rank}/{lane}/{epoch}/{segment}/{k}"
                yield raw
            self.counter.muted = False
            segment, offset = segment + 1, 0
            self.cursor.position = (epoch, segment, 0)

    def _shards(self, lane: int, epoch: int, segment: int, salt: int) -> list[str]:
        n = self.shards_per_segment
        if self.resampled:
            return drawn_shards(self.urls, self.seed, salt, self.rank, lane, epoch, segment, n)
        mine = lane_shards(self.urls, self.seed, epoch, self.rank, self.world_size, lane, self.num_lanes)
        return mine[segment * n : (segment + 1) * n]

    def _segment(self, shards: list[str], rng) -> Iterator[dict]:
        read = wds.tarfile_to_samples(handler=self.counter.handle)
        samples = map(self.keep, interleave([read(iter([{"url": url}])) for url in shards]))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        return samples


def _borrow(source: Iterator[dict]) -> Iterator[dict]:
    """Iterate `source` without closing it when this iterator is dropped (the next epoch continues it)."""
    for item in source:  # noqa: UP028  (`yield from` would close `source` along with this generator)
        yield item


@dataclass
class TakePlanned:
    """After batching: stop after the number of batches the plan gives this worker (resampled epochs)."""

    plan: Plan

    def __call__(self, batches: Iterable[dict]) -> Iterator[dict]:
        quota = self.plan.row(worker_info()[0])[4]
        return iter(batches) if quota < 0 else itertools.islice(batches, quota)


@dataclass
class StreamState:
    """The main process's record of one rank's training stream (small: a few ints per lane).

    Args:
        num_lanes: lanes of this rank (DataLoader workers, at least 1).
        quota: batches per lane per epoch (resampled), or -1 (finite: until the lane's shards end).
        fingerprint: what the stream is a function of besides the position (shards, seed, layout); a saved
            state with another fingerprint cannot be continued exactly.
    """

    num_lanes: int
    quota: int
    fingerprint: str
    epoch: int = 0
    positions: list[list[int]] = field(default_factory=list)  # per lane: [epoch, segment, offset]
    consumed: list[int] = field(default_factory=list)  # per lane: batches consumed this epoch
    next_lane: int = 0  # the lane whose batch the round-robin delivers next
    exhausted: bool = False  # the DataLoader ran through the current epoch
    salt: int = 0  # nonzero after a layout change: a fresh resampled stream, reproducible from the state

    def __post_init__(self) -> None:
        self.positions = self.positions or [[0, 0, 0] for _ in range(self.num_lanes)]
        self.consumed = self.consumed or [0] * self.num_lanes

    def begin_epoch(self) -> list[list[int]]:
        """The plan rows for the DataLoader epoch about to start (a new epoch once the last one ran out)."""
        if self.exhausted:
            self.epoch += 1
            # Finite: the next epoch's shards. Resampled streams continue, unless no batch was reported
            # (code iterating the loader without `on_before_batch_transfer`): then a stream of the new epoch.
            if self.quota < 0 or not any(self.consumed):
                self.positions = [[self.epoch, 0, 0] for _ in range(self.num_lanes)]
            self.consumed, self.next_lane, self.exhausted = [0] * self.num_lanes, 0, False
        rows = []
        for worker in range(self.num_lanes):
            lane = (worker + self.next_lane) % self.num_lanes
            quota = self.quota - self.consumed[lane] if self.quota >= 0 else -1
            rows.append([lane, *self.positions[lane], quota, self.salt])
        return rows

    def consume(self, lane: int, position: list[int]) -> None:
        """A batch of `lane` reached the model; the lane stands at `position` after it."""
        self.positions[lane] = [int(p) for p in position]
        self.consumed[lane] += 1
        self.next_lane = (lane + 1) % self.num_lanes

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "positions": [list(p) for p in self.positions],
                "consumed": list(self.consumed), "next_lane": self.next_lane, "exhausted": self.exhausted,
                "salt": self.salt}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved stream; one saved with another fingerprint restarts (and says so): a finite stream
        at the start of its current epoch, a resampled one as a fresh stream salted by the batches done."""
        if state["fingerprint"] == self.fingerprint:
            self.epoch, self.next_lane, self.exhausted = state["epoch"], state["next_lane"], state["exhausted"]
            self.positions = [list(p) for p in state["positions"]]
            self.consumed, self.salt = list(state["consumed"]), state["salt"]
            return
        self.epoch = state["epoch"]
        self.positions = [[self.epoch, 0, 0] for _ in range(self.num_lanes)]
        if self.quota >= 0:
            self.salt = 1 + state["salt"] + sum(p[1] for p in state["positions"])
        log.warning(
            "the training stream changed since the checkpoint (shards, seed, workers, ranks, batch or buffer "
            "settings): it cannot continue where it stopped, so it %s",
            "restarts as a fresh resampled stream" if self.quota >= 0 else f"restarts epoch {self.epoch}",
        )


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class StreamLoader(DataLoader):
    """A DataLoader over a LaneSource pipeline: writes the plan before each epoch, notes when one runs out."""

    def __init__(self, dataset, *, state: StreamState, plan: Plan, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.state, self.plan = state, plan

    def __iter__(self):
        self.plan.write(self.state.begin_epoch())
        return _NoteEnd(super().__iter__(), self.state)


class _NoteEnd:
    """Passes batches through; marks the stream state exhausted when the epoch's iterator ends."""

    def __init__(self, iterator, state: StreamState) -> None:
        self.iterator, self.state = iterator, state

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.state.exhausted = True
            raise

    def __len__(self) -> int:
        return len(self.iterator)
