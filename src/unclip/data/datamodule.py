"""WebDataModule: one LightningDataModule over WebDataset shards that serves every stage.

Pipeline per split (each DataLoader worker runs its own copy):

    train   LaneSource: segments of shards (drawn with replacement, or the epoch's shards split by rank and
            worker), read, unused members dropped, shuffled per segment  -> decode -> batched(+ data_stats)
    val     shards in order -> split by rank -> split by worker -> tarfile_to_samples -> drop unused members
            -> decode -> batched(+ data_stats)

The training stream is resumable: it is a pure function of (seed, rank, worker lane, position), the
position of every lane is part of `state_dict`, and a resumed run continues each lane exactly where the
last batch the model consumed left it (unclip.data.stream has the details and the guarantees).

Every bad input is skipped and counted by a `SkipCounter` (one per worker). Each batch carries the
worker's cumulative counts under `data_stats`; `on_before_batch_transfer` pops that entry (the model never
sees it), keeps the latest counts per worker, and counts the delivered samples, so `skipped_counts()` is a
sum over workers of their latest totals and `samples_seen()` counts what reached the model. Both are per
rank: reduce them across ranks when logging (e.g. `sync_dist=True, reduce_fx="sum"`); checkpoints hold
every rank's counts and stream position (gathered when saving).

Splitting by rank uses the rank that Lightning reports at `setup`, not webdataset's `split_by_node`:
webdataset infers the rank inside each worker from environment variables or `torch.distributed`, and
with spawned workers (or launchers that do not export RANK) it silently sees rank 0 of 1, so every rank
would read every shard.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from unclip.data.errors import SkipCounter
from unclip.data.sample import IMAGE_KEYS, PRECOMPUTED_FIELDS, SampleDecoder, to_unit_range
from unclip.data.shards import expand_shards, is_local
from unclip.data.stages import (
    DATA_STATS_KEY,
    Batched,
    Collate,
    Cursor,
    Decode,
    KeepMembers,
    SizedPipeline,
    SplitByRank,
)
from unclip.data.stream import LaneSource, Plan, StreamLoader, StreamState, TakePlanned, fingerprint
from unclip.data.text import check_templates, resolve_class_names
from unclip.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTransform
from unclip.utils.ranks import gather_per_rank

log = logging.getLogger(__name__)

ShardSpec = str | Sequence[str]
__all__ = ["DATA_STATS_KEY", "WebDataModule"]


class WebDataModule(pl.LightningDataModule):
    """Image-caption WebDataset shards -> batches of the batch contract (see `unclip.data.sample`).

    Args:
        train_shards, val_shards: brace pattern, local glob, `pipe:` command, URL, or a list of these.
        image_size: side S of `image` (B, 3, S, S).
        lowres_size: side of `lowres_image`, the same crop downsampled (upsampler stages); None: absent.
        clip_image_size: side of `clip_image`, the same crop at CLIP's resolution; None: absent.
        batch_size: per-rank training batch size; val_batch_size defaults to it.
        num_workers: DataLoader workers per rank (finite mode may use fewer, with a warning).
        caption_key: "txt" (or another text member), "json:<field>", or "cls" (class label + template).
        class_names: names indexed by the .cls label, or "imagenet" (open_clip's ImageNet names).
        caption_templates: for "cls": templates with one "{}", one drawn per sample; default "{}".
        lowercase: lowercase captions.
        random_crop, random_flip: training augmentation (validation: centre crop, no flip).
        resampled: True: an endless training stream drawn with replacement from the shards, `epoch_length`
            samples per epoch across all ranks (the configs' choice at scale); False, the default, so that
            shards alone make a working module: each training sample exactly once per epoch (partial batches
            dropped).
        epoch_length: samples per training epoch over all ranks (required when resampled).
        shuffle_buffer: samples in each worker's shuffle buffer (training); <= 1 disables shuffling.
        shards_per_segment: training shards read together (interleaved) into one shuffle; the buffer is
            emptied between such groups, so a resume re-reads at most this many shards.
        load_image: False skips image decoding (e.g. a prior trained on precomputed embeddings).
        precomputed: which of image_embed, text_embed, text_tokens, text_mask to read from .npy members.
        prepare: zero-argument callable run once per node in `prepare_data` (e.g. a shard generator).
        seed: base seed of shard order, shuffling, crops, flips and template choice.
        pin_memory, prefetch_factor: DataLoader options (prefetch_factor applies when num_workers > 0).
        worker_start_method: how loader workers start ("fork", "forkserver", "spawn"; None: the platform's
            default). "forkserver" for CPU data parallel: forking a rank whose collective threads are running
            can deadlock the new worker.
        max_image_pixels: images with more pixels are skipped as "oversized_image".
        uint8_transfer: the loader ships images as uint8 and `transfer_batch_to_device` converts them to
            float32 in [-1, 1] on the device: the model sees the same batch, the workers spend about half
            the CPU at 256 px (docs/DATA.md), and host memory and host-to-device traffic shrink 4x. Code
            that iterates the DataLoader itself then receives uint8 images.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        image_size: int = 64,
        lowres_size: int | None = None,
        clip_image_size: int | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        caption_key: str = "txt",
        class_names: Sequence[str] | str | None = None,
        caption_templates: Sequence[str] | None = None,
        lowercase: bool = False,
        random_crop: bool = True,
        random_flip: bool = False,
        resampled: bool = False,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        shards_per_segment: int = 2,
        load_image: bool = True,
        precomputed: Sequence[str] = (),
        prepare: Callable[[], object] | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        worker_start_method: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        uint8_transfer: bool = False,
    ) -> None:
        super().__init__()
        self.train_shards = _as_spec(train_shards)
        self.val_shards = _as_spec(val_shards)
        self.image_size = image_size
        self.lowres_size = lowres_size
        self.clip_image_size = clip_image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.worker_start_method = worker_start_method
        self.caption_key = caption_key
        self.class_names = resolve_class_names(class_names)
        self.caption_templates = check_templates(caption_templates)
        self.lowercase = lowercase
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.shuffle_buffer = shuffle_buffer
        self.shards_per_segment = shards_per_segment
        self.load_image = load_image
        self.precomputed = tuple(precomputed)
        self.prepare = prepare
        self.seed = seed
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.max_image_pixels = max_image_pixels
        self.uint8_transfer = uint8_transfer
        self._validate()
        self._rank, self._world_size = 0, 1
        self._urls: dict[str, list[str]] = {}
        self._latest: dict[tuple[str, str], dict[str, int]] = {}  # (split, worker source) -> skip totals
        self._restored: dict[str, dict[str, int]] = {}  # split -> skip totals from a checkpoint
        self._seen: dict[str, int] = {}  # split -> samples delivered to the model
        self._stream: StreamState | None = None  # the training stream's position
        self._stream_restored: dict | None = None  # ... as loaded from a checkpoint, until the loader exists

    def _validate(self) -> None:
        if self.image_size <= 0 or self.batch_size <= 0 or self.num_workers < 0 or self.shards_per_segment < 1:
            raise ValueError("image_size, batch_size and shards_per_segment must be positive and num_workers >= 0")
        if self.lowres_size is not None and not 0 < self.lowres_size < self.image_size:
            raise ValueError(f"lowres_size={self.lowres_size} must be in (0, image_size={self.image_size})")
        if not self.load_image and (self.lowres_size or self.clip_image_size):
            raise ValueError("lowres_size and clip_image_size need images: set load_image=True or unset them")
        if self.caption_key == "cls" and not self.class_names:
            raise ValueError("caption_key='cls' needs class_names (a list, or 'imagenet')")
        unknown = set(self.precomputed) - set(PRECOMPUTED_FIELDS)
        if unknown:
            raise ValueError(f"precomputed fields {sorted(unknown)} unknown; choose from {PRECOMPUTED_FIELDS}")
        if self.train_shards is not None and self.resampled and not self.epoch_length:
            raise ValueError(
                "resampled=True draws an infinite stream: set epoch_length (training samples per epoch "
                "across all ranks), or use resampled=False to read each sample once per epoch"
            )

    # ---------------------------------------------------------------------------------- Lightning hooks

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check the shards: a pattern matching nothing, a missing local shard, or local shards
        without a single usable sample fail here, naming the pattern."""
        self._rank, self._world_size = _rank_and_world_size(self.trainer)
        wanted = {"fit": ("train", "val"), "validate": ("val",), None: ("train", "val")}.get(stage, ())
        for split in wanted:
            spec = self.train_shards if split == "train" else self.val_shards
            if spec is not None and split not in self._urls:
                urls = expand_shards(spec)
                self._check_first_sample(split, spec, urls)
                self._urls[split] = urls

    def train_dataloader(self) -> DataLoader:
        if "train" not in self._urls:
            raise RuntimeError("no training shards: set train_shards (and call setup('fit') first)")
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []  # Lightning reads an empty list as "no validation"
        if "val" not in self._urls:
            raise RuntimeError("call setup('fit') or setup('validate') before val_dataloader()")
        return self._loader("val")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Pop the worker's cumulative skip counts (so the model never sees them); count the samples and
        record the training stream's position after this batch."""
        stats = batch.pop(DATA_STATS_KEY, None) if isinstance(batch, dict) else None
        if stats is not None:
            split = stats["split"]
            self._latest[(split, stats["source"])] = stats["skipped"]
            # Counted here rather than in the workers: batches a worker prefetched but the loop never
            # consumed (e.g. after the sanity check) were not seen.
            self._seen[split] = self._seen.get(split, 0) + len(batch["key"])
            if "lane" in stats and self._stream is not None:
                self._stream.consume(stats["lane"], stats["position"])
        return batch

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Move the batch; uint8 images (uint8_transfer) become float32 (B, 3, H, W) in [-1, 1] there.

        Done here rather than in `on_after_batch_transfer`, which stays free for the systems (Lightning
        calls the DataModule's version of a batch hook instead of the LightningModule's when both exist).
        """
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if isinstance(batch, dict):
            for name in IMAGE_KEYS:
                if name in batch and batch[name].dtype == torch.uint8:
                    batch[name] = to_unit_range(batch[name])
        return batch

    def state_dict(self) -> dict:
        """Per rank: the counts so far and the training stream's position (plain ints and strings, so it
        loads with weights_only). Every rank's entry is gathered when several ranks save together."""
        splits = {split for split, _ in self._latest} | set(self._restored)
        mine = {"seen": dict(self._seen), "skipped": {split: self.skipped_counts(split) for split in splits},
                "stream": self._stream.state_dict() if self._stream is not None else self._stream_restored}
        return {"ranks": gather_per_rank(self.trainer, mine)}

    def load_state_dict(self, state_dict: dict) -> None:
        """This rank's entry; after a change in the number of ranks, rank 0 takes over all counts and the
        stream restarts (see StreamState.load_state_dict)."""
        ranks = state_dict.get("ranks", [state_dict])  # before per-rank states: one rank's counts
        if len(ranks) == self._world_size and ranks[self._rank] is not None:
            mine = ranks[self._rank]
        else:
            known = [r for r in ranks if r is not None]
            mine = {"seen": {}, "skipped": {}, "stream": known[0].get("stream") if known else None}
            if self._rank == 0:
                for other in known:
                    for split, n in other["seen"].items():
                        mine["seen"][split] = mine["seen"].get(split, 0) + n
                    for split, counts in other["skipped"].items():
                        for reason, n in counts.items():
                            totals = mine["skipped"].setdefault(split, {})
                            totals[reason] = totals.get(reason, 0) + n
        self._seen = dict(mine["seen"])
        self._restored = {split: dict(counts) for split, counts in mine["skipped"].items()}
        self._latest.clear()
        self._stream, self._stream_restored = None, mine.get("stream")

    # ---------------------------------------------------------------------------------------- counting

    def skipped_counts(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples by reason on this rank, summed over workers (and splits when split is None)."""
        sources = [c for s, c in self._restored.items() if split in (None, s)]
        sources += [c for (s, _), c in self._latest.items() if split in (None, s)]
        totals: dict[str, int] = {}
        for counts in sources:
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals

    def samples_seen(self, split: str | None = "train") -> int:
        """Samples delivered to the model on this rank (training by default; None: all splits)."""
        return sum(n for s, n in self._seen.items() if split in (None, s))

    # ---------------------------------------------------------------------------------------- pipeline

    def _decoder(self, train: bool) -> SampleDecoder:
        transform = None
        if self.load_image:
            transform = ImageTransform(
                image_size=self.image_size,
                lowres_size=self.lowres_size,
                clip_image_size=self.clip_image_size,
                random_crop=train and self.random_crop,
                random_flip=train and self.random_flip,
                max_image_pixels=self.max_image_pixels,
            )
        return SampleDecoder(
            caption_key=self.caption_key,
            transform=transform,
            precomputed=self.precomputed,
            class_names=self.class_names,
            templates=self.caption_templates,
            lowercase=self.lowercase,
        )

    def _samples(self, counter: SkipCounter) -> list:
        """Validation stages from raw tar streams to decoded samples (in shard order, no shuffle)."""
        decoder = self._decoder(train=False)
        return [
            wds.tarfile_to_samples(handler=counter.handle),
            wds.map(KeepMembers(decoder.member_names())),
            Decode(decoder, counter, self.seed, self._rank),
        ]

    def _loader(self, split: str) -> DataLoader:
        if split == "train":
            return self._train_loader()
        urls = self._urls[split]
        workers = self._finite_workers(split, len(urls))
        counter = SkipCounter(split)
        stages = [
            wds.SimpleShardList(urls),
            SplitByRank(self._rank, self._world_size),
            wds.split_by_worker,
            *self._samples(counter),
            wds.batched(self.val_batch_size, collation_fn=Collate(counter, self.uint8_transfer), partial=True),
        ]
        return DataLoader(wds.DataPipeline(*stages), batch_size=None, **self._loader_options(workers))

    def _train_loader(self) -> StreamLoader:
        """The resumable training stream (unclip.data.stream); its position lives in `self._stream`."""
        urls = self._urls["train"]
        if self.resampled:
            workers = self.num_workers
            quota = math.ceil(self.epoch_length / (self._world_size * max(1, workers) * self.batch_size))
        else:
            workers, quota = self._finite_workers("train", len(urls)), -1
        lanes = max(1, workers)
        key = fingerprint(urls, self.seed, self.resampled, self.shuffle_buffer, self.shards_per_segment, lanes,
                          self._world_size, self.batch_size, quota)
        if self._stream is None or self._stream.fingerprint != key:
            self._stream = StreamState(lanes, quota, key)
            if self._stream_restored is not None:
                self._stream.load_state_dict(self._stream_restored)
            self._stream_restored = None
        counter, cursor, plan = SkipCounter("train"), Cursor(), Plan(workers)
        decoder = self._decoder(train=True)
        source = LaneSource(urls, self.seed, self._rank, self._world_size, lanes, self.resampled,
                            self.shards_per_segment, self.shuffle_buffer, KeepMembers(decoder.member_names()),
                            counter, plan, cursor)
        stages = [
            source,
            Decode(decoder, counter, self.seed, self._rank),
            Batched(self.batch_size, Collate(counter, self.uint8_transfer, cursor)),  # partial batches dropped
            TakePlanned(plan),
        ]
        dataset = SizedPipeline(*stages, length=quota * lanes) if self.resampled else wds.DataPipeline(*stages)
        return StreamLoader(dataset, state=self._stream, plan=plan, batch_size=None,
                            **self._loader_options(workers))

    def _loader_options(self, workers: int) -> dict:
        return dict(
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,  # keeps each worker's open lane reader and counters across epochs
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            worker_init_fn=_ignore_preemption_signals if workers > 0 else None,
            multiprocessing_context=self.worker_start_method if workers > 0 else None,
            # Worker seeds from a generator of their own: loading never draws from the global torch stream,
            # which the training step's draws (and a resume's replay of them) rely on.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _finite_workers(self, split: str, num_shards: int) -> int:
        """Workers per rank such that every (rank, worker) reads at least one shard."""
        if num_shards < self._world_size:
            raise ValueError(
                f"{split}_shards: {num_shards} shard(s) cannot be split over {self._world_size} ranks so "
                f"that each sample is read exactly once; write at least {self._world_size} shards"
                + (" or use resampled=True" if split == "train" else "")
            )
        if split == "train" and self._world_size > 1:
            log.warning(
                "train resampled=False on %d ranks: ranks may receive different numbers of batches, which "
                "stalls DDP at the end of an epoch unless every rank's shards hold the same number of "
                "samples; resampled=True avoids this",
                self._world_size,
            )
        workers = min(self.num_workers, num_shards // self._world_size)
        if workers < self.num_workers:
            log.warning(
                "%s_shards: %d shard(s) over %d rank(s) feed at most %d worker(s) per rank; using %d instead "
                "of num_workers=%d",
                split,
                num_shards,
                self._world_size,
                workers,
                workers,
                self.num_workers,
            )
        return workers

    def _check_first_sample(self, split: str, spec: ShardSpec, urls: list[str]) -> None:
        """Read local shards until one sample decodes; raise, naming the pattern, if none does.

        Remote shards are not read here: opening them costs a network round trip and they may be
        throttled; a broken remote source shows up as "unreadable_shard" counts and warnings instead.
        """
        local = [u for u in urls if is_local(u)]
        if not local:
            return
        counter = SkipCounter(f"{split}-check")
        stages = [wds.SimpleShardList(local), *self._samples(counter)]
        if next(iter(wds.DataPipeline(*stages)), None) is None:
            raise ValueError(
                f"{split}_shards {spec!r}: no usable sample in {len(local)} local shard(s); "
                f"skipped by reason: {counter.counts}"
            )


def _as_spec(spec: ShardSpec | None) -> ShardSpec | None:
    """Hydra hands lists over as ListConfig: make them plain lists of str."""
    if spec is None or isinstance(spec, str):
        return spec
    return [str(s) for s in spec]


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 / SIGUSR2 to the main process, which stops at a step
    boundary and shuts them down (a cluster often signals every process of a job)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _rank_and_world_size(trainer: pl.Trainer | None) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
