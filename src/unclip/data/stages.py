"""WebDataset pipeline stages: small picklable callables (so spawned DataLoader workers work too).

Training samples carry their own seed (`__seed__`, from their stream position: unclip.data.stream); the
validation pipeline seeds its generator from (seed, rank, worker) and draws the same values every pass.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds

from unclip.data.errors import SkipCounter
from unclip.data.sample import SampleDecoder, collate

DATA_STATS_KEY = "data_stats"


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def seeded_rng(*parts: object) -> random.Random:
    """A generator seeded from `parts`; string seeds hash the same in every process (unlike hash())."""
    return random.Random("/".join(str(p) for p in parts))


@dataclass
class Cursor:
    """Training: the lane this copy of the pipeline serves and its stream position (epoch, segment, offset)
    after the last raw sample it produced (see unclip.data.stream)."""

    lane: int = -1
    position: tuple[int, int, int] = (0, 0, 0)


@dataclass
class SplitByRank:
    """Every `world_size`-th shard starting at `rank` (webdataset's split_by_node, with an explicit rank)."""

    rank: int
    world_size: int

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        yield from itertools.islice(src, self.rank, None, self.world_size)


@dataclass
class KeepMembers:
    """Drop the members the decoder never reads before they occupy the shuffle buffer."""

    names: frozenset[str]

    def __call__(self, raw: dict) -> dict:
        return {k: v for k, v in raw.items() if k in self.names or k.startswith("__")}


@dataclass
class Decode:
    """wds.map over the decoder; failures go to the counter. A sample's randomness comes from a generator
    seeded by its `__seed__` (training: its stream position, so a resumed run draws the same crops), else
    from one generator per pass seeded by (seed, rank, worker): validation captions and crops are then
    identical across evaluations."""

    decoder: SampleDecoder
    counter: SkipCounter
    seed: int
    rank: int

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        pass_rng = seeded_rng("sample", self.seed, self.rank, worker_info()[0], 0)

        def decode(raw: dict) -> dict:
            rng = seeded_rng("sample", raw["__seed__"]) if "__seed__" in raw else pass_rng
            try:
                out = self.decoder(raw, rng)
            except Exception as exn:
                exn.sample_ref = f"{raw.get('__key__')} in {raw.get('__url__')}"
                raise
            self.counter.good()
            return out

        yield from wds.map(decode, handler=self.counter.handle)(src)


@dataclass
class Collate:
    """Batch the samples and attach, under DATA_STATS_KEY, the worker's cumulative skip counts and (training)
    the lane and its stream position after the batch's last sample."""

    counter: SkipCounter
    uint8_images: bool = False
    cursor: Cursor | None = None

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples, self.uint8_images)
        stats = self.counter.snapshot()
        if self.cursor is not None:
            stats["lane"], stats["position"] = self.cursor.lane, list(self.cursor.position)
        batch[DATA_STATS_KEY] = stats
        return batch


@dataclass
class Batched:
    """Full batches only, each yielded as soon as its last sample arrives (wds.batched reads one sample
    ahead, which would move the training stream's position past the batch it reports)."""

    batch_size: int
    collation_fn: Collate

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        batch: list[dict] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collation_fn(batch)
                batch = []


class SizedPipeline(wds.DataPipeline):
    """A DataPipeline with a known number of batches per rank (for progress bars and LR schedules)."""

    def __init__(self, *stages: object, length: int) -> None:
        super().__init__(*stages)
        self.length = length

    def __len__(self) -> int:
        return self.length
