"""WebDataset pipeline stages: small picklable callables (so spawned DataLoader workers work too).

Each stage that draws random numbers seeds its generator from (seed, rank, worker, epoch); its epoch
counter lives in the worker's copy of the pipeline, so the DataLoader's workers must be persistent.
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
class WorkerSeed:
    """`worker_seed` for ResampledShards: distinct per (rank, worker), with the rank known at setup."""

    rank: int

    def __call__(self) -> int:
        return self.rank * 65536 + worker_info()[0]


class ShuffledShardList(wds.SimpleShardList):
    """Shards in a new seeded order each epoch; the same order on every rank and worker, so the
    rank/worker splits that follow stay disjoint and complete."""

    def __init__(self, urls: list[str], seed: int) -> None:
        super().__init__(urls)
        self.base_seed = seed
        self.epoch = -1

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        urls = list(self.urls)
        seeded_rng("shards", self.base_seed, self.epoch).shuffle(urls)
        for url in urls:
            yield {"url": url}


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
class Shuffle:
    """wds.shuffle with a generator seeded per (seed, rank, worker, epoch)."""

    bufsize: int
    seed: int
    rank: int
    epoch: int = -1

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = seeded_rng("shuffle", self.seed, self.rank, worker_info()[0], self.epoch)
        yield from wds.shuffle(self.bufsize, initial=min(100, self.bufsize), rng=rng)(src)


@dataclass
class Decode:
    """wds.map over the decoder, with per-sample randomness from a generator seeded per
    (seed, rank, worker, epoch); failures go to the counter. Validation reuses epoch 0 every time so its
    captions and crops are identical across evaluations."""

    decoder: SampleDecoder
    counter: SkipCounter
    seed: int
    rank: int
    advance_epoch: bool
    epoch: int = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = seeded_rng("sample", self.seed, self.rank, worker_info()[0], self.epoch)
        self.epoch += int(self.advance_epoch)

        def decode(raw: dict) -> dict:
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
    """Batch the samples and attach the worker's cumulative counts under DATA_STATS_KEY."""

    counter: SkipCounter
    uint8_images: bool = False

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples, self.uint8_images)
        batch[DATA_STATS_KEY] = self.counter.snapshot()
        return batch


class SizedPipeline(wds.DataPipeline):
    """A DataPipeline with a known number of batches per rank (for progress bars and LR schedules)."""

    def __init__(self, *stages: object, length: int) -> None:
        super().__init__(*stages)
        self.length = length

    def __len__(self) -> int:
        return self.length
