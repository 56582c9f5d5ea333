"""Loader throughput: synthetic 256 px JPEG shards -> WebDataModule batches, images/s per worker.

    python bench/loader_throughput.py                 # 2,000 samples, sizes 64 and 256, 1 and 2 workers
    python bench/loader_throughput.py --samples 500   # quicker

For each (output size, workers) the training loader (finite mode, random crop + flip, shuffle buffer)
runs one untimed epoch (worker start-up, page cache) and one timed epoch, reported both as images per
wall-clock second and as images per CPU-second of the workers (independent of other load on the machine),
once with float32 images (the default) and once with uint8_transfer=True.
A second table times the per-image decode + transform in one process against a plain PIL baseline (full
decode, resize, crop).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from unclip.data.datamodule import WebDataModule
from unclip.data.transforms import ImageTransform


def synthetic_photo(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """Natural-ish content: smooth colour field, blurred shapes, fine texture (not flat colour)."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = [np.sin(2 * np.pi * (rng.uniform(0.3, 2) * x + rng.uniform(0.3, 2) * y) + rng.uniform(0, 6)) for _ in "rgb"]
    image = Image.fromarray((np.stack(field, -1) * 70 + 128).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(10, size // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write_shards(root: Path, samples: int, shards: int, seed: int = 0) -> tuple[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    per_shard = samples // shards
    payloads = []
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                synthetic_photo(rng).save(buffer, format="JPEG", quality=90)
                payloads.append(buffer.getvalue())
                sink.write({"__key__": f"{s:05d}{i:05d}", "jpg": payloads[-1], "txt": f"synthetic photo {i}"})
    return f"{root}/{{00000..{shards - 1:05d}}}.tar", payloads


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rates(spec: str, image_size: int, workers: int, batch_size: int, uint8: bool) -> tuple[float, float]:
    """(images per wall-clock second, images per worker CPU-second) over one epoch after a warm-up.

    The second number does not depend on how many cores are free: on a shared machine it is the
    honest per-worker figure; the first is what a training loop would see on this machine right now.
    """
    dm = WebDataModule(
        train_shards=spec, image_size=image_size, batch_size=batch_size, num_workers=workers,
        resampled=False, random_crop=True, random_flip=True, shuffle_buffer=256, pin_memory=False,
        uint8_transfer=uint8,
    )  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch: worker start-up, page cache
        pass
    iterator = iter(loader)  # persistent workers: the same processes as the warm-up epoch
    pids = [worker.pid for worker in iterator._workers]
    start, cpu_start, images = time.perf_counter(), sum(map(cpu_seconds, pids)), 0
    for batch in iterator:
        images += len(dm.on_before_batch_transfer(batch, 0)["key"])
    wall, cpu = time.perf_counter() - start, sum(map(cpu_seconds, pids)) - cpu_start
    return images / wall, images / cpu


def naive_transform(data: bytes, size: int) -> np.ndarray:
    """Baseline: full decode, shorter side to `size` (bicubic), centre crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def per_image_ms(fn, payloads: list[bytes]) -> float:
    start = time.perf_counter()
    for data in payloads:
        fn(data)
    return 1000 * (time.perf_counter() - start) / len(payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"# {machine}, {args.samples} samples x 256 px JPEG")
    print(f"# load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        spec, payloads = write_shards(Path(tmp), args.samples, args.shards)
        mean_kb = sum(map(len, payloads)) / len(payloads) / 1024
        print(f"# shards: {args.shards}, mean JPEG size {mean_kb:.1f} KiB, batch size {args.batch_size}\n")
        print("| output size | workers | images shipped as | images/s (wall) | per worker (wall) | per worker CPU-s |")
        print("|---:|---:|---|---:|---:|---:|")
        for size in args.sizes:
            for workers in args.workers:
                for uint8 in (False, True):
                    rate, per_cpu = loader_rates(spec, size, workers, args.batch_size, uint8)
                    shipped = "uint8 (uint8_transfer)" if uint8 else "float32"
                    print(f"| {size} | {workers} | {shipped} | {rate:.0f} | {rate / workers:.0f} | {per_cpu:.0f} |")
        print("\n| output size | ImageTransform ms/image | plain PIL ms/image | speed-up |")
        print("|---:|---:|---:|---:|")
        rng = random.Random(0)
        sample = payloads[:300]
        for size in args.sizes:
            transform = ImageTransform(size, random_crop=True, random_flip=True)
            ours = per_image_ms(partial(transform, rng=rng), sample)
            naive = per_image_ms(partial(naive_transform, size=size), sample)
            print(f"| {size} | {ours:.2f} | {naive:.2f} | {naive / ours:.1f}x |")


if __name__ == "__main__":
    main()
