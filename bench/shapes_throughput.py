"""Single-process throughput of the `shapes` generator: render + encode + tar write, images per second.

    python bench/shapes_throughput.py [--num 4000] [--sizes 256 64] [--format jpg]

Reports wall-clock and CPU-time rates (CPU time of this process, so other load on a shared machine
inflates the wall figure but barely the CPU one), and the split between rendering and encoding.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from unclip.data.shapes import SPLITS, ShapesOptions, _encode, make_sample, write_shard


def _rate(fn, num: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of ``fn()`` producing ``num`` images."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return num / (time.perf_counter() - wall), num / (time.process_time() - cpu)


def bench(num: int, image_size: int, image_format: str) -> None:
    options = ShapesOptions(
        num_train=num,
        num_val=0,
        num_heldout=0,
        shard_size=min(num, 10_000),
        image_size=image_size,
        image_format=image_format,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train").mkdir()
        write_shard(tmp, "train", 0, ShapesOptions(num_train=200, image_size=image_size))  # warm up
        wall, cpu = _rate(lambda: write_shard(tmp, "train", 0, options), num)
    samples = [make_sample(0, SPLITS[0], i, image_size) for i in range(min(num, 1000))]
    _, render_cpu = _rate(lambda: [make_sample(0, SPLITS[0], i, image_size) for i in range(len(samples))], len(samples))
    _, encode_cpu = _rate(lambda: [_encode(s[0], image_format) for s in samples], len(samples))
    print(
        f"{image_size:4d} px {image_format}: {wall:7.0f} img/s wall, {cpu:7.0f} img/s per CPU second "
        f"(sample+render alone {render_cpu:.0f}/s, encode alone {encode_cpu:.0f}/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=4000, help="images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    args = parser.parse_args()
    print(f"{platform.machine()}, Python {platform.python_version()}, single process")
    for size in args.sizes:
        bench(args.num, size, args.format)


if __name__ == "__main__":
    main()
