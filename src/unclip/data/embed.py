"""Embedding precompute: CLIP embeddings computed once and stored with the data they belong to.

    python -m unclip.data.embed data=webdataset data.train_shards='/data/laion/{00000..41407}.tar' \\
        clip=vit_l14 out_dir=/data/laion_vit_l14 [text_tokens=true] [batch_size=256] [num_workers=8]

For every input shard, `out_dir/<its name>` holds each good sample with all its original members, byte for
byte, plus (fields of the batch contract, read back with `WebDataModule(precomputed=[...])`):

    image_embed.npy   float16 (D,)     CLIP image embedding (not normalised)
    text_embed.npy    float16 (D,)     CLIP text embedding of the caption training would see (not normalised)
    text_tokens.npy   float16 (L, W)   final-layer token states                    (text_tokens=true)
    text_mask.npy     bool (L,)        real tokens, not padding                    (text_tokens=true)

Bad samples are skipped and counted by reason and left out. Beside each output shard, `<stem>_embed.json`
holds the shard's float64 sums of the L2-normalised image embeddings, its sample and skip counts and the
settings it was made with; `out_dir/embed_stats.json` combines them over all input shards (the prior's
`embed_norm=standardize` reads `image_embed_mean` / `image_embed_std` from it).

Flow: DataLoader workers each read one input shard at a time (tar reading, captions exactly as training
cleans them, PIL decode, centre crop at CLIP's resolution, tokenisation) and send chunks of up to
`batch_size` samples; the main process runs the frozen CLIP, and a writer thread appends the results to the
shard's temporary output while the next batch runs. At the shard's end the sidecar is written, then the
shard is renamed into place: an output shard exists only when complete, and a rerun skips it (resume).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from unclip.data.errors import SHARD_REASONS, SkipCounter
from unclip.data.sample import PRECOMPUTED_FIELDS, SampleDecoder, to_unit_range
from unclip.data.shards import expand_shards
from unclip.data.stages import seeded_rng, worker_info
from unclip.data.text import check_templates, resolve_class_names
from unclip.data.transforms import ImageTransform

log = logging.getLogger(__name__)

__all__ = ["precompute_embeddings", "read_embed_stats", "shard_name", "STATS_FILE"]

STATS_FILE = "embed_stats.json"
SIDECAR_SUFFIX = "_embed.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")  # the repository's conf/ (src/unclip/data/..)
# Precomputed fields already in an input (e.g. from another CLIP) are replaced, never kept beside the new ones.
STALE_MEMBERS = frozenset(f"{name}.npy" for name in PRECOMPUTED_FIELDS)
WRITES_IN_FLIGHT = 4  # chunks queued for the writer thread before the GPU loop waits for it


# ----------------------------------------------------------------------------------------- shard names


def shard_name(url: str) -> str:
    """The file name of a shard URL: "/d/00001.tar", "https://h/00001.tar?x=1", "pipe:aws s3 cp s3://b/00001.tar -"
    all give "00001.tar"."""
    if url.startswith("pipe:"):
        words = [urlparse(w.strip("'\"")).path for w in url[5:].split()]
        names = [os.path.basename(w) for w in words if w.endswith(TAR_SUFFIXES)]
        if not names:
            raise ValueError(f"cannot tell the shard name in {url!r}: no word of the command ends in .tar")
        return names[-1]
    name = os.path.basename(urlparse(url).path if "://" in url or url.startswith("file:") else url)
    if not name:
        raise ValueError(f"cannot tell the shard name of {url!r}")
    return name


def output_names(urls: Sequence[str]) -> list[str]:
    """Output file names, one per input URL; two inputs with one name would overwrite each other."""
    names = [shard_name(u) for u in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names):
        if name in seen:
            raise ValueError(
                f"input shards {seen[name]!r} and {url!r} are both named {name!r} and would write the same output "
                "shard; embed them into separate out_dir folders"
            )
        seen[name] = url
    return names


def sidecar_name(name: str) -> str:
    """"00001.tar" -> "00001_embed.json" (next to img2dataset's "00001_stats.json")."""
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + SIDECAR_SUFFIX
    return name + SIDECAR_SUFFIX


# ------------------------------------------------------------------------------------- reading (workers)


class ShardChunks(IterableDataset):
    """Input shards -> chunks of up to `batch_size` decoded samples, one shard at a time per worker.

    Worker w of n reads shards w, w + n, ... in order. Each chunk is a dict:
        shard    index into `urls`
        keys     list of B sample keys
        entries  list of B bytes: each sample's original members as tar entries, in their input order
                 (serialised here, in parallel, so the single writer thread only appends)
        image    uint8 (B, S, S, 3), the centre crop at CLIP's resolution
        tokens   int64 (B, L), token ids of the cleaned caption
        last     True on the shard's final chunk (which may have B = 0)
        skipped  on the last chunk: the shard's skip counts by reason, else None
    """

    def __init__(self, urls: Sequence[tuple[int, str]], decoder: SampleDecoder, tokenizer: Any,
                 batch_size: int) -> None:
        super().__init__()
        self.urls = list(urls)
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.counter = SkipCounter("embed")

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        for index, url in self.urls[worker::num_workers]:
            yield from self._shard(index, url)

    def _shard(self, index: int, url: str) -> Iterator[dict]:
        before = dict(self.counter.snapshot()["skipped"])
        pending: list[tuple[str, bytes, np.ndarray, str]] = []
        for raw in self._complete_samples(url, before):
            decoded = self._decode(raw)
            if decoded is not None:
                pending.append(decoded)
            if len(pending) == self.batch_size:
                yield self._chunk(index, pending, last=False)
                pending = []
        after = self.counter.snapshot()["skipped"]
        skipped = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}
        yield self._chunk(index, pending, last=True, skipped=skipped)

    def _complete_samples(self, url: str, before: dict[str, int]) -> Iterator[dict]:
        """The raw samples of one shard, one behind the reader: when reading ends with a shard-level error
        (truncated or corrupt tar), the last sample may lack members, so it is dropped ("truncated_sample")."""
        previous = None
        for raw in wds.tarfile_to_samples(handler=self.counter.handle)(iter([{"url": url}])):
            if previous is not None:
                yield previous
            previous = raw
        counts = self.counter.snapshot()["skipped"]
        if previous is not None and any(counts.get(r, 0) > before.get(r, 0) for r in SHARD_REASONS):
            self.counter.skip("truncated_sample", f"{previous.get('__key__')} in {url}: last sample before the error")
        elif previous is not None:
            yield previous

    def _decode(self, raw: dict) -> tuple[str, bytes, np.ndarray, str] | None:
        """(key, tar entries of the members to keep, image (S, S, 3) uint8, caption), or None when skipped."""
        key = str(raw.get("__key__"))
        try:
            # The rng only draws a caption template (caption_key="cls"): seeded by key, so reruns agree.
            out = self.decoder(raw, seeded_rng("embed", key))
        except Exception as exn:
            exn.sample_ref = f"{key} in {raw.get('__url__')}"
            self.counter.handle(exn)
            return None
        self.counter.good()
        kept = [(ext, data) for ext, data in raw.items() if not ext.startswith("__") and ext not in STALE_MEMBERS]
        return key, b"".join(tar_entry(f"{key}.{ext}", data) for ext, data in kept), out["image"], out["caption"]

    def _chunk(self, index: int, samples: list, last: bool, skipped: dict | None = None) -> dict:
        size = self.decoder.transform.image_size
        images = np.stack([s[2] for s in samples]) if samples else np.zeros((0, size, size, 3), np.uint8)
        captions = [s[3] for s in samples]
        tokens = self.tokenizer(captions) if captions else torch.zeros(0, 1, dtype=torch.long)
        return {
            "shard": index,
            "keys": [s[0] for s in samples],
            "entries": [s[1] for s in samples],
            "image": torch.from_numpy(images),  # (B, S, S, 3) uint8, permuted on the device
            "tokens": tokens,
            "last": last,
            "skipped": skipped,
        }


# ------------------------------------------------------------------------------------ encoding (main)


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """"auto": bf16 autocast on CUDA, full fp32 elsewhere; "bf16" or "fp32" by request (None = no autocast)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


@torch.no_grad()
def encode_chunk(encoder: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None, text_tokens: bool) -> dict[str, torch.Tensor]:
    """uint8 images (B, S, S, 3) and token ids (B, L) -> CPU tensors: image_embed, text_embed float32 (B, D),
    and with `text_tokens` also text_tokens float16 (B, L, W) and text_mask bool (B, L)."""
    x = to_unit_range(images.to(device, non_blocking=True).permute(0, 3, 1, 2))  # (B, 3, S, S) in [-1, 1]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        image_embed = encoder.encode_image(x)
        text = encoder.encode_text(tokens.to(device, non_blocking=True))
    out = {"image_embed": image_embed.float(), "text_embed": text["text_embed"].float()}
    if text_tokens:
        out["text_tokens"] = text["text_tokens"].half()  # stored as fp16: convert before the copy (2x less)
        out["text_mask"] = text["text_mask"]
    return {name: value.cpu() for name, value in out.items()}


# --------------------------------------------------------------------------------- writing (a thread)


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (what `np.load` reads back)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_rows(array: np.ndarray) -> list[bytes]:
    """The .npy file of each row: array (B, ...) -> B files of array[i]. The rows share one header (same dtype
    and shape), so it is built once rather than B times."""
    array = np.ascontiguousarray(array)
    first = npy_bytes(array[0])
    header = first[: len(first) - array[0].nbytes]
    return [header + row.tobytes() for row in array]


def tar_entry(name: str, data: bytes) -> bytes:
    """One regular-file tar member: header (ustar, PAX records only where a name needs them; mtime 0 and no
    owner, so identical inputs give identical shards), data, zero padding to the 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o444
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardOutput:
    """One output shard being written: a temporary tar, float64 sums of the unit image embeddings, counts."""

    def __init__(self, path: Path, embed_dim: int) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.file = gzip.open(self.tmp, "wb") if path.name.endswith(("gz", "tgz")) else open(self.tmp, "wb")
        self.count = 0
        self.sum = np.zeros(embed_dim, np.float64)
        self.sum_sq = np.zeros(embed_dim, np.float64)
        self.skipped: dict[str, int] = {}

    def write(self, keys: list[str], entries: list[bytes], fields: dict[str, torch.Tensor]) -> None:
        """Append B samples: their original members (tar entries) plus the fields (image_embed (B, D), ...)
        as .npy members."""
        stored = {name: v.half().numpy() if v.is_floating_point() else v.numpy() for name, v in fields.items()}
        # fp16 overflow (|x| > 65504) or a NaN from the model: such a sample is dropped, not stored.
        finite = np.ones(len(keys), bool)
        for array in stored.values():
            if array.dtype == np.float16:
                finite &= np.isfinite(array.reshape(len(keys), -1)).all(1)
        for i in np.flatnonzero(~finite):
            self.skipped["nonfinite_embed"] = self.skipped.get("nonfinite_embed", 0) + 1
            log.warning("embed: skipped %s in %s: non-finite embedding", keys[i], self.path.name)
        files = {name: npy_rows(array) for name, array in stored.items()}
        for i in np.flatnonzero(finite):
            npys = [tar_entry(f"{keys[i]}.{name}.npy", rows[i]) for name, rows in files.items()]
            self.file.write(b"".join([entries[i], *npys]))
        image_embed = fields["image_embed"].numpy()[finite].astype(np.float64)  # (B', D)
        unit = image_embed / np.maximum(np.linalg.norm(image_embed, axis=1, keepdims=True), 1e-12)
        self.sum += unit.sum(0)
        self.sum_sq += (unit**2).sum(0)
        self.count += int(finite.sum())

    def finish(self, skipped: dict[str, int], settings: dict) -> dict | None:
        """Close; write the sidecar, then rename the shard into place. A shard that failed as a whole (a
        shard-level error and no sample) is not written, so the next run tries it again: returns None."""
        self.close()
        for reason, n in self.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        if self.count == 0 and SHARD_REASONS & set(skipped):
            self.tmp.unlink(missing_ok=True)
            return None
        sidecar = {"count": self.count, "image_embed_sum": self.sum.tolist(),
                   "image_embed_sum_sq": self.sum_sq.tolist(), "skipped": skipped, "settings": settings}
        atomic_write_text(self.path.with_name(sidecar_name(self.path.name)), json.dumps(sidecar))
        os.replace(self.tmp, self.path)
        return sidecar

    def close(self) -> None:
        """End the archive (two zero blocks, then whole 10 KiB records, as GNU tar writes it)."""
        if not self.file.closed:
            self.file.write(b"\0" * 1024)
            self.file.write(b"\0" * (-self.file.tell() % tarfile.RECORDSIZE))
            self.file.close()


class ShardWriter:
    """Receives encoded chunks in order and keeps one `ShardOutput` per shard in progress (one per worker)."""

    def __init__(self, out_dir: Path, names: list[str], embed_dim: int, settings: dict) -> None:
        self.out_dir, self.names, self.embed_dim, self.settings = out_dir, names, embed_dim, settings
        self.open: dict[int, ShardOutput] = {}
        self.finished: dict[int, dict] = {}  # shard index -> sidecar
        self.failed: dict[int, dict[str, int]] = {}  # shard index -> skip counts
        self.broken = False

    def __call__(self, chunk: dict, fields: dict[str, torch.Tensor] | None) -> None:
        if self.broken:
            return  # an earlier chunk failed: write nothing more (the main loop raises that error)
        try:
            self._write(chunk, fields)
        except BaseException:
            self.broken = True
            raise

    def _write(self, chunk: dict, fields: dict[str, torch.Tensor] | None) -> None:
        index = chunk["shard"]
        if index not in self.open:
            self.open[index] = ShardOutput(self.out_dir / self.names[index], self.embed_dim)
        output = self.open[index]
        if fields is not None:
            output.write(chunk["keys"], chunk["entries"], fields)
        if chunk["last"]:
            skipped = dict(chunk["skipped"])
            sidecar = output.finish(skipped, self.settings)
            del self.open[index]
            if sidecar is None:
                self.failed[index] = skipped
                log.warning("embed: %s could not be read (%s); it is left for the next run", self.names[index], skipped)
            else:
                self.finished[index] = sidecar

    def abort(self) -> None:
        """Close and remove unfinished temporary shards (after an error)."""
        for output in self.open.values():
            output.close()
            output.tmp.unlink(missing_ok=True)
        self.open.clear()


# ------------------------------------------------------------------------------------------- statistics


def embed_settings(encoder: torch.nn.Module, caption_key: str, class_names: list[str] | None,
                   templates: list[str], lowercase: bool, text_tokens: bool) -> dict:
    """What an output shard's content depends on: shards made with other settings must not be mixed."""
    names_sha = hashlib.sha256(json.dumps(class_names).encode()).hexdigest() if class_names else None
    return {"clip_weights_sha256": encoder.identity["weights_sha256"], "image_size": encoder.image_size,
            "caption_key": caption_key, "class_names_sha256": names_sha, "caption_templates": templates,
            "lowercase": lowercase, "text_tokens": text_tokens}


def read_sidecar(out_dir: Path, name: str, settings: dict) -> dict | None:
    """The sidecar of a finished output shard, or None when the shard is not finished.

    Raises ValueError when the shard was made with other settings (another CLIP, other captions).
    """
    sidecar_path = out_dir / sidecar_name(name)
    if not (out_dir / name).is_file() or not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except ValueError:
        return None  # a damaged sidecar: redo the shard
    if sidecar.get("settings") != settings:
        old = sidecar.get("settings") or {}
        differ = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        raise ValueError(
            f"{out_dir / name} was embedded with other settings ({', '.join(differ)} differ); shards made "
            f"with different CLIPs or captions must not be mixed: use another out_dir or delete that one"
        )
    return sidecar


def combine_stats(sidecars: list[dict], extra_skipped: list[dict[str, int]], embed_dim: int) -> dict:
    """Per-dimension mean and (population) std of the unit image embeddings from the shards' float64 sums."""
    count = sum(s["count"] for s in sidecars)
    total = np.zeros(embed_dim, np.float64)
    total_sq = np.zeros(embed_dim, np.float64)
    skipped: dict[str, int] = {}
    for s in sidecars:
        total += np.asarray(s["image_embed_sum"], np.float64)
        total_sq += np.asarray(s["image_embed_sum_sq"], np.float64)
    for counts in [s["skipped"] for s in sidecars] + extra_skipped:
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - mean**2, 0.0)  # E[x^2] - E[x]^2, clamped against rounding
    return {"count": count, "image_embed_mean": mean.tolist(), "image_embed_std": np.sqrt(var).tolist(),
            "skipped": dict(sorted(skipped.items()))}


def read_embed_stats(out_dir: str | os.PathLike) -> dict:
    """The `embed_stats.json` of a precompute output folder."""
    return json.loads((Path(out_dir) / STATS_FILE).read_text())


# ------------------------------------------------------------------------------------------------- API


def precompute_embeddings(
    encoder: torch.nn.Module,
    shards: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    caption_key: str = "txt",
    class_names: Sequence[str] | str | None = None,
    caption_templates: Sequence[str] | None = None,
    lowercase: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    text_tokens: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> dict:
    """Embed every sample of `shards` with the frozen `encoder` (a ClipEncoder) into `out_dir`; returns the
    statistics also written to `out_dir/embed_stats.json`. See the module docstring for the layout.

    Args:
        shards: brace pattern, local glob, `pipe:` command, URL, or a list of these (as for WebDataModule).
        out_dir: a local folder; output shards take their input's file name.
        caption_key, class_names, caption_templates, lowercase: captions as the data config builds them
            (with several templates, each sample's is drawn with a generator seeded by its key).
        batch_size: samples per CLIP forward pass (chunks never span two shards).
        num_workers: DataLoader workers decoding shards (one shard per worker at a time).
        text_tokens: also store text_tokens (L, W) and text_mask (L,).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        precision: "auto" (bf16 autocast on CUDA, else fp32), "bf16" or "fp32".
    """
    if batch_size <= 0 or num_workers < 0:
        raise ValueError("batch_size must be positive and num_workers >= 0")
    urls = expand_shards(shards)
    names = output_names(urls)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    class_names = resolve_class_names(class_names)
    if caption_key == "cls" and not class_names:
        raise ValueError("caption_key='cls' needs class_names (a list, or 'imagenet')")
    templates = check_templates(caption_templates)
    target = resolve_device(device)
    dtype = autocast_dtype(precision, target)
    settings = embed_settings(encoder, caption_key, class_names, templates, lowercase, text_tokens)

    done = {i: s for i, name in enumerate(names) if (s := read_sidecar(out, name, settings)) is not None}
    todo = [(i, url) for i, url in enumerate(urls) if i not in done]
    if done:
        log.info("embed: %d of %d shards already in %s; embedding the other %d", len(done), len(urls), out, len(todo))
    writer = ShardWriter(out, names, encoder.embed_dim, settings)
    if todo:
        _run(encoder, todo, writer, SampleDecoder(
            caption_key=caption_key, transform=ImageTransform(image_size=encoder.image_size),
            class_names=class_names, templates=templates, lowercase=lowercase,
        ), batch_size, num_workers, text_tokens, target, dtype, progress)

    sidecars = [done.get(i) or writer.finished.get(i) for i in range(len(urls))]
    stats = combine_stats([s for s in sidecars if s is not None], list(writer.failed.values()), encoder.embed_dim)
    if stats["count"] == 0:
        raise RuntimeError(f"no sample of the {len(urls)} shard(s) {shards!r} could be embedded; skipped by "
                           f"reason: {stats['skipped']}")
    identity = {k: v for k, v in encoder.identity.items() if k != "architecture" or _small(v)}
    stats.update({
        "embed_dim": encoder.embed_dim,
        "clip": identity,
        "shards": shards if isinstance(shards, str) else [str(s) for s in shards],
        "num_shards": len(urls),
        "failed_shards": [urls[i] for i in sorted(writer.failed)],
        "count_this_run": sum(s["count"] for s in writer.finished.values()),
        "text_tokens": text_tokens,
        "settings": settings,
    })
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1, default=str))
    if stats["failed_shards"]:
        log.warning("embed: %d shard(s) could not be read; rerun the same command to retry them: %s",
                    len(stats["failed_shards"]), stats["failed_shards"][:5])
    return stats


def _run(encoder: torch.nn.Module, todo: list[tuple[int, str]], writer: ShardWriter, decoder: SampleDecoder,
         batch_size: int, num_workers: int, text_tokens: bool, target: torch.device, dtype: torch.dtype | None,
         progress: bool) -> None:
    """Read, encode and write the shards in `todo` (the writer runs in a thread, one batch behind the GPU)."""
    encoder.requires_grad_(False).eval().to(target)
    workers = min(num_workers, len(todo))
    loader = DataLoader(
        ShardChunks(todo, decoder, encoder.tokenizer, batch_size),
        batch_size=None,  # chunks are batches already
        num_workers=workers,
        pin_memory=target.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    in_flight: deque[Future] = deque()
    shards_done = 0
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(disable=not progress, unit="img", desc="embed") as bar:
        try:
            for chunk in loader:
                fields = None
                if chunk["keys"]:
                    fields = encode_chunk(encoder, chunk["image"], chunk["tokens"], target, dtype, text_tokens)
                in_flight.append(pool.submit(writer, chunk, fields))  # one thread: chunks written in order
                while len(in_flight) > WRITES_IN_FLIGHT or (in_flight and in_flight[0].done()):
                    in_flight.popleft().result()  # re-raises a writer error here
                shards_done += chunk["last"]
                bar.update(len(chunk["keys"]))
                bar.set_postfix(shards=f"{shards_done}/{len(todo)}", refresh=False)
            while in_flight:
                in_flight.popleft().result()
        except BaseException:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)
            writer.abort()
            raise


def _small(value: Any) -> bool:
    """Whether a value is small enough to repeat in the stats file."""
    return len(json.dumps(value, default=str)) < 4096


# ------------------------------------------------------------------------------------------------- CLI


def run_from_config(cfg: Any) -> dict:
    """The CLI's work on a composed `conf/embed.yaml` config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    data = cfg.data
    try:
        shards = _plain(cfg.shards) if OmegaConf.is_list(cfg.shards) else str(cfg.shards)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        raise ValueError("no input shards: pass shards=PATTERN (or data.train_shards=PATTERN)") from None
    if data.get("prepare") is not None and _uses_data_shards(cfg):
        instantiate(data.prepare)()  # e.g. generate the `shapes` dataset on first use
    encoder = instantiate(cfg.clip, trainable=False)
    return precompute_embeddings(
        encoder,
        shards,
        cfg.out_dir,
        caption_key=data.get("caption_key", "txt"),
        class_names=_plain(data.get("class_names")),
        caption_templates=_plain(data.get("caption_templates")),
        lowercase=bool(data.get("lowercase", False)),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        text_tokens=cfg.text_tokens,
        device=cfg.device,
        precision=cfg.precision,
        progress=cfg.progress,
    )


def _uses_data_shards(cfg: Any) -> bool:
    """Whether `shards` are the data config's own (then its `prepare` step, if any, makes them)."""
    from omegaconf import OmegaConf

    keys = [k for k in ("train_shards", "val_shards") if k in cfg.data and not OmegaConf.is_missing(cfg.data, k)]
    return any(cfg.data[k] is not None and cfg.shards == cfg.data[k] for k in keys)


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def main() -> None:
    """Hydra entry point: `python -m unclip.data.embed data=... clip=... out_dir=...` (conf/embed.yaml)."""
    import hydra

    import unclip.config  # noqa: F401  (registers the resolvers the configs use)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="embed")
    def run(cfg) -> None:
        stats = run_from_config(cfg)
        skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
        print(f"embedded {stats['count']} samples in {stats['num_shards'] - len(stats['failed_shards'])} "
              f"shards into {Path(cfg.out_dir).absolute()} (skipped: {skipped})")
        if stats["failed_shards"]:
            print(f"{len(stats['failed_shards'])} shard(s) could not be read; rerun to retry them")

    run()


if __name__ == "__main__":
    main()
