"""Copy the samples of some `shapes` scenes from shards to new shards (for ablations on part of the grammar).

    python bench/shapes_subset.py --src 'outputs/cpu_study/data/embed/train/*.tar' --out /tmp/one_large \
        --objects 1 --size large

Keeps a sample when its `json` attributes (the generator's, carried through `python -m unclip.data.embed`) name
`--objects` objects and, with `--size`, every object is of that size; every file of a kept sample is copied
unchanged, shard by shard (same names). Prints kept / read. docs/RESULTS.md trains the study's decoder on such
subsets to ask how much of each kind of scene it needs to learn shape.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

from unclip.data.shapes import SIZES
from unclip.data.shards import read_tar_samples


def keep_sample(attributes: dict, objects: int, size: str | None) -> bool:
    """Whether a scene has `objects` objects, all of `size` (any size when None)."""
    found = attributes.get("objects") or []
    return len(found) == objects and (size is None or all(o.get("size") == size for o in found))


def subset_shard(src: str, dst: Path, objects: int, size: str | None) -> tuple[int, int]:
    """Write the kept samples of tar shard `src` to `dst`; returns (kept, read)."""
    samples = read_tar_samples(src)
    kept = 0
    with tarfile.open(dst, "w") as tout:
        for key, files in samples.items():
            attributes = (json.loads(files["json"]).get("attributes") or {}) if "json" in files else {}
            if not keep_sample(attributes, objects, size):
                continue
            kept += 1
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return kept, len(samples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="glob of `shapes` shards (raw or embedded)")
    parser.add_argument("--out", required=True, help="folder for the new shards")
    parser.add_argument("--objects", type=int, default=1, choices=(1, 2), help="objects per kept scene")
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="keep only scenes whose objects are all of this size")
    args = parser.parse_args(argv)
    paths = sorted(glob.glob(args.src))
    if not paths:
        raise SystemExit(f"no shards match {args.src!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file: give a folder for the new shards")
    names = [Path(p).name for p in paths]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SystemExit(f"shards of the same name in different folders ({clash[0]}, ...): each new shard takes its "
                         "source's name, so match one folder per run")
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise SystemExit(f"--out {out} holds the source shards: the subset would overwrite them; give another folder")
    out.mkdir(parents=True, exist_ok=True)
    kept = read = 0
    for path in paths:
        k, n = subset_shard(path, out / Path(path).name, args.objects, args.size)
        kept, read = kept + k, read + n
    print(f"kept {kept} of {read} samples in {len(paths)} shards -> {out}")


if __name__ == "__main__":
    main()
