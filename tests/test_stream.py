"""The training stream resumes exactly: cut anywhere, save the DataModule state, load it into a new one and
the batches that follow are the ones an uninterrupted stream yields (keys and pixels), per rank."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from unclip.data.datamodule import WebDataModule
from unclip.data.stream import StreamState, lane_shards

from .test_datamodule import jpg_txt_shards, pattern

NUM_SHARDS, PER_SHARD = 6, 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("stream")
    keys = jpg_txt_shards(root, NUM_SHARDS, PER_SHARD, width=24, height=20)  # non-square: random crops draw
    return pattern(root, NUM_SHARDS), keys


def make_dm(spec: str, rank: int = 0, world_size: int = 1, **kw) -> WebDataModule:
    options = dict(train_shards=spec, resampled=True, image_size=8, batch_size=3, num_workers=0, pin_memory=False,
                   shuffle_buffer=5, epoch_length=24, random_crop=True, random_flip=True)
    dm = WebDataModule(**{**options, **kw})
    dm.setup("fit")
    dm._rank, dm._world_size = rank, world_size  # what setup reads from a DDP trainer
    return dm


def consume(dm: WebDataModule, num_batches: int, state: dict | None = None) -> tuple[list, dict]:
    """Train-loop style: epochs run until the loader is exhausted; returns (key, pixel sum) per batch and the
    state after `num_batches` (round-tripped through a weights-only torch.load, like a checkpoint)."""
    if state is not None:
        dm.load_state_dict(state)
    loader = dm.train_dataloader()
    seen: list = []
    while len(seen) < num_batches:
        for batch in loader:
            dm.on_before_batch_transfer(batch, 0)
            seen.append((tuple(batch["key"]), round(float(batch["image"].sum()), 4)))
            if len(seen) == num_batches:
                break
    buffer = Path(dm.train_shards.split("{")[0]).parent / "state.pt"
    torch.save(dm.state_dict(), buffer)
    return seen, torch.load(buffer, weights_only=True)


CASES = {
    "resampled, main process": dict(),
    "resampled, 2 workers": dict(num_workers=2),
    "resampled, 3 workers, 1 shard per segment": dict(num_workers=3, shards_per_segment=1),
    "finite, main process": dict(resampled=False),
    "finite, 2 workers": dict(resampled=False, num_workers=2),
}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_a_resumed_stream_continues_exactly(shards, options):
    """Cuts mid-segment, mid-epoch with the workers' round-robin mid-cycle (odd counts), and at epoch ends."""
    spec, _ = shards
    total = 22
    reference, _ = consume(make_dm(spec, **options), total)
    for cut in (1, 5, 8, 13):
        before, state = consume(make_dm(spec, **options), cut)
        after, _ = consume(make_dm(spec, **options), total - cut, state)
        assert before + after == reference, f"cut after {cut} batches"


def test_a_finite_epoch_yields_every_sample_once_across_a_resume(shards):
    spec, keys = shards
    per_epoch = NUM_SHARDS * PER_SHARD // 3  # 20 batches: every lane's shards hold whole batches
    before, state = consume(make_dm(spec, resampled=False, num_workers=2), 7)
    after, _ = consume(make_dm(spec, resampled=False, num_workers=2), 2 * per_epoch - 7, state)
    batches = before + after
    for epoch in (batches[:per_epoch], batches[per_epoch:]):
        assert Counter(k for b in epoch for k in b[0]) == Counter(keys)
    assert batches[:per_epoch] != batches[per_epoch:]  # a new order each epoch


def test_each_rank_resumes_its_own_stream(shards):
    spec, _ = shards
    reference = [consume(make_dm(spec, rank=r, world_size=2, resampled=False), 6)[0] for r in (0, 1)]
    assert not {k for b in reference[0] for k in b[0]} & {k for b in reference[1] for k in b[0]}
    cut = [consume(make_dm(spec, rank=r, world_size=2, resampled=False), 2) for r in (0, 1)]
    # What rank 0 writes: every rank's entry (gathered over the ranks in a real DDP save).
    checkpoint = {"ranks": [cut[0][1]["ranks"][0], cut[1][1]["ranks"][0]]}
    for r in (0, 1):
        after, _ = consume(make_dm(spec, rank=r, world_size=2, resampled=False), 4, checkpoint)
        assert cut[r][0] + after == reference[r]


def test_a_changed_stream_restarts_and_says_so(shards, caplog):
    spec, _ = shards
    _, state = consume(make_dm(spec, resampled=False), 5)
    fresh, _ = consume(make_dm(spec, resampled=False), 3)
    with caplog.at_level("WARNING"):
        restarted, _ = consume(make_dm(spec, resampled=False, shuffle_buffer=4), 3, state)
    assert "cannot continue where it stopped" in caplog.text and "restarts epoch 0" in caplog.text
    assert [b[0] for b in restarted] != [b[0] for b in fresh]  # another buffer: another order, from the start
    resampled = StreamState(num_lanes=1, quota=8, fingerprint="new")
    resampled.load_state_dict({**StreamState(1, 8, "old").state_dict(), "positions": [[0, 3, 2]]})
    assert resampled.positions == [[0, 0, 0]] and resampled.salt == 4  # a fresh stream, reproducibly salted


def test_finite_lanes_split_the_epochs_shards():
    urls = [f"s{i}" for i in range(10)]
    lanes = [lane_shards(urls, 0, 3, r, 2, lane, 2) for r in (0, 1) for lane in (0, 1)]
    assert sorted(u for lane in lanes for u in lane) == urls
    assert lane_shards(urls, 0, 3, 0, 2, 0, 2) != lane_shards(urls, 0, 4, 0, 2, 0, 2)


def test_epochs_differ_when_the_loader_is_iterated_without_the_hook(shards):
    spec, _ = shards
    dm = make_dm(spec, num_workers=2)
    loader = dm.train_dataloader()
    first, second = ([tuple(b["key"]) for b in loader] for _ in range(2))
    assert len(first) == len(second) == 8 and first != second
