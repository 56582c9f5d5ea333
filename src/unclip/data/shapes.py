"""`shapes`: a seeded generator of captioned synthetic images, written as img2dataset-style shards.

It lets the whole text-to-image pipeline train and be judged with no external data. A scene is one or two
flat-coloured objects on a neutral background, rendered antialiased (see ``shapes_render``).

Vocabularies (caption synonyms in brackets):

==========  ===========================================================================================
shape       circle [disk], square, triangle, star, diamond [rhombus], cross
colour      red, orange, yellow, green, cyan, blue, purple, pink
size        small [tiny, little], medium [medium-sized, mid-sized], large [big]; the side of the object's
            unit box is 0.125, 0.18, 0.25 of the image side (+-4% jitter): >= 8 px at 64 px
position    3x3 grid: top left, top, top right, left, center, right, bottom left, bottom, bottom right
            ["upper"/"lower" for top/bottom, "middle"/"centre" for center, several phrasings]
relation    left of [to the left of, on the left of], right of [...], above [over], below [under, beneath]
background  white, gray [grey], black
==========  ===========================================================================================

Scenes: one object (caption states shape, colour, size, position) or two objects in distinct cells (caption
states shapes, colours and a relation that holds, sometimes sizes). "left of"/"right of" need different
columns, "above"/"below" different rows. Objects stay inside their cell with a margin, so they never touch.
Half of the captions also name the background.

Compositional held-out split: the colour-shape pairs in ``HELDOUT_PAIRS`` (each colour and each shape at
most once, so every colour and every shape still appears in training) never occur in ``train``/``val``;
every ``heldout`` scene has at least one of them.

Output (img2dataset layout): ``{out_dir}/{split}/{shard:05d}.tar`` with members ``{key}.jpg|png``,
``{key}.txt`` (caption), ``{key}.json`` (img2dataset fields + ``split`` + ``attributes``); keys are
``{shard:05d}{index_in_shard:04d}``; ``{shard:05d}_stats.json`` per shard; ``{out_dir}/manifest.json``.
Every sample's randomness derives from (seed, split, index), so shards written by parallel processes are
byte-identical to a serial run.

CLI: ``python -m unclip.data.shapes out_dir=data/shapes num_train=20000 seed=0 num_workers=2``
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from unclip.data.shapes_render import BACKGROUNDS, COLOURS, SHAPES, render_pil

GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
SIZES: dict[str, float] = {"small": 0.125, "medium": 0.18, "large": 0.25}  # unit-box side / image side
SIZE_JITTER = 0.04  # relative, uniform
CELL_MARGIN = 0.025  # least gap between an object's box and its cell's border, fraction of the image side
POSITIONS: tuple[str, ...] = (  # row-major 3x3 grid: index = 3 * row + col
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HORIZONTAL_RELATIONS: tuple[str, ...] = ("left of", "right of")  # the rest are vertical (above, below)
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (  # (colour, shape); each colour and shape at most once
    ("red", "square"), ("orange", "star"), ("yellow", "circle"),
    ("green", "triangle"), ("blue", "cross"), ("purple", "diamond"),
)
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "relation", "background")
JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed member metadata keeps shards byte-identical across runs

_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)

# Caption vocabulary: canonical name -> words used in captions (first = canonical).
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
SHAPE_WORDS = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disk"), "diamond": ("diamond", "rhombus")}
BACKGROUND_WORDS = {"white": ("white",), "gray": ("gray", "grey"), "black": ("black",)}
# The words two objects of one caption can exchange (unclip.data.text.swap_words: one class per entry, synonyms
# joined by "|"): CLIP's swap negatives (model.swap_negatives) and the binding test of eval.zero_shot.
SWAP_GROUPS: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": ["|".join(SHAPE_WORDS[s]) for s in SHAPES],
    "size": ["|".join(SIZE_WORDS[s]) for s in SIZES],
}
# The held-out colour-shape pairs as caption phrases: no swap negative may bring one in (the split stays unseen).
HELDOUT_PHRASES: list[str] = [f"{c} {w}" for c, s in HELDOUT_PAIRS for w in SHAPE_WORDS[s]]
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_ONE_TEMPLATES = (
    "{obj} {pos}", "a picture of {obj} {pos}", "an image of {obj} {pos}", "there is {obj} {pos}",
    "{pos}, {obj}", "{obj}, {pos}",
)
_TWO_TEMPLATES = (
    "{a} {rel} {b}", "{a} is {rel} {b}", "a picture of {a} {rel} {b}", "an image of {a} {rel} {b}",
    "there is {a} {rel} {b}",
)
_BACKGROUND_TEMPLATES = (" on a {bg} background", " against a {bg} background", ", {bg} background")


# ----------------------------------------------------------------------------------------------- sampling
def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """Independent RNG of one sample, from (seed, split, index) only (so shards can be made in parallel).

    Only ``Random.random()`` is used on it: its stream is guaranteed stable across Python versions.
    """
    digest = hashlib.blake2b(f"shapes/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _pick(rng: random.Random, seq: Sequence):
    return seq[int(rng.random() * len(seq))]


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def relation_holds(relation: str, a: dict, b: dict) -> bool:
    """Whether ``a`` is `relation` ``b`` on the grid (objects as dicts with ``row`` and ``col``)."""
    if relation in HORIZONTAL_RELATIONS:
        return a["col"] < b["col"] if relation == "left of" else a["col"] > b["col"]
    return a["row"] < b["row"] if relation == "above" else a["row"] > b["row"]


def _sample_object(rng: random.Random, pair: tuple[str, str], cell: int, sizes: Sequence[str] = tuple(SIZES)) -> dict:
    colour, shape = pair
    size = _pick(rng, tuple(sizes))
    scale = SIZES[size] * (1.0 + SIZE_JITTER * (2.0 * rng.random() - 1.0))
    row, col = divmod(cell, 3)
    slack = (1.0 / 3.0 - scale) / 2.0 - CELL_MARGIN  # how far the centre may move and stay in the cell
    cx = (col + 0.5) / 3.0 + _uniform(rng, -slack, slack)
    cy = (row + 0.5) / 3.0 + _uniform(rng, -slack, slack)
    return dict(shape=shape, colour=colour, size=size, row=row, col=col, position=POSITIONS[cell],
                center=[round(cx, 6), round(cy, 6)], scale=round(scale, 6))


def sample_scene(rng: random.Random, split: str, max_objects: int = 2, sizes: Sequence[str] = tuple(SIZES)) -> dict:
    """Draw a scene: ``{"background", "objects": [...], "relation", "heldout"}`` (relation: objects[0]
    `relation` objects[1], or None). ``heldout`` scenes hold at least one pair of ``HELDOUT_PAIRS``.
    ``max_objects=1`` and a subset of ``sizes`` give a simpler grammar (the same draws otherwise)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    num_objects = 1 if rng.random() < 0.5 or max_objects == 1 else 2
    heldout_slot = int(rng.random() * num_objects) if split == "heldout" else -1
    cells = list(range(9))
    objects = []
    for slot in range(num_objects):
        pairs = HELDOUT_PAIRS if slot == heldout_slot else _ALL_PAIRS if split == "heldout" else _TRAIN_PAIRS
        cell = cells.pop(int(rng.random() * len(cells)))
        objects.append(_sample_object(rng, _pick(rng, pairs), cell, sizes))
    relation = None
    if num_objects == 2:
        relation = _pick(rng, [r for r in RELATIONS if relation_holds(r, *objects)])
    heldout = any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in objects)
    return dict(background=_pick(rng, tuple(BACKGROUNDS)), objects=objects, relation=relation, heldout=heldout)


# ------------------------------------------------------------------------------------------------ captions
def _position_phrase(rng: random.Random, row: int, col: int) -> str:
    vertical = _pick(rng, (("top", "upper"), ("middle",), ("bottom", "lower"))[row])
    horizontal = ("left", "middle", "right")[col]
    if row != 1 and col != 1:  # corner
        joint = _pick(rng, (" ", "-"))
        phrase = f"{_pick(rng, ('in the', 'at the'))} {vertical}{joint}{horizontal}"
        return phrase + _pick(rng, ("", " corner", " of the image"))
    if row != 1:  # top or bottom edge, middle column
        edge = ("top", "", "bottom")[row]
        return _pick(rng, (f"at the {edge}", f"in the {vertical} middle", f"at the {vertical} center"))
    if col != 1:  # left or right edge, middle row
        return _pick(rng, (f"on the {horizontal}", f"on the {horizontal} side", f"in the middle {horizontal}"))
    return _pick(rng, ("in the center", "in the middle", "in the centre", "at the center of the image"))


def _object_phrase(rng: random.Random, obj: dict, with_size: bool) -> str:
    words = [_pick(rng, SIZE_WORDS[obj["size"]])] if with_size else []
    words += [obj["colour"], _pick(rng, SHAPE_WORDS[obj["shape"]])]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


# The plainest phrasing of each position (zero-shot prompts); the generator varies around these.
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}


def canonical_caption(size: str, colour: str, shape: str, position: str) -> str:
    """The plainest single-object caption, e.g. "a small red circle in the top left"."""
    return f"a {size} {colour} {shape} {POSITION_PHRASES[position]}"


def make_caption(rng: random.Random, scene: dict) -> tuple[str, list[str]]:
    """Caption a scene; returns (caption, stated attribute names, in ``ATTRIBUTES`` order)."""
    objects = scene["objects"]
    if len(objects) == 1:
        stated = ["shape", "colour", "size", "position"]
        obj = objects[0]
        text = _pick(rng, _ONE_TEMPLATES).format(
            obj=_object_phrase(rng, obj, True), pos=_position_phrase(rng, obj["row"], obj["col"])
        )
    else:
        with_size = rng.random() < 0.5
        stated = ["shape", "colour", *(["size"] if with_size else []), "relation"]
        a, b = (_object_phrase(rng, o, with_size) for o in objects)
        text = _pick(rng, _TWO_TEMPLATES).format(a=a, b=b, rel=_pick(rng, RELATION_WORDS[scene["relation"]]))
    if rng.random() < 0.5:
        stated.append("background")
        text += _pick(rng, _BACKGROUND_TEMPLATES).format(bg=_pick(rng, BACKGROUND_WORDS[scene["background"]]))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text, stated


def _invert(words: dict[str, tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    return {tuple(re.findall(r"[a-z]+", w)): name for name, ws in words.items() for w in ws}


def parse_caption(text: str) -> dict:
    """Read the stated attributes back from a caption (any the generator writes, and similar free text).

    Returns ``{"objects": [{"shape", "colour", ["size"], ["position", "row", "col"]}], "relation",
    "background", "stated", "heldout"}``, where objects carry only stated keys and ``relation`` /
    ``background`` are None when not stated. Raises ValueError when no reading is possible.
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    shapes, sizes = _invert(SHAPE_WORDS), _invert(SIZE_WORDS)
    shape_at = [i for i, t in enumerate(tokens) if (t,) in shapes]
    if not 1 <= len(shape_at) <= 2:
        raise ValueError(f"expected one or two shapes {SHAPES} in {text!r}, found {len(shape_at)}")
    used: set[int] = set()
    objects = []
    for i in shape_at:
        if i == 0 or tokens[i - 1] not in COLOURS:
            raise ValueError(f"{tokens[i]!r} in {text!r} needs a colour {tuple(COLOURS)} right before it")
        obj = {"shape": shapes[(tokens[i],)], "colour": tokens[i - 1]}
        used |= {i, i - 1}
        for n in (2, 1):  # "medium sized" before "medium"
            if i - 1 - n >= 0 and tuple(tokens[i - 1 - n : i - 1]) in sizes:
                obj["size"] = sizes[tuple(tokens[i - 1 - n : i - 1])]
                used |= set(range(i - 1 - n, i - 1))
                break
        objects.append(obj)
    background = _parse_background(tokens, used, text)
    relation = None
    if len(objects) == 2:
        relation = _parse_relation(tokens[shape_at[0] + 1 : shape_at[1] - 1], text)
    else:
        objects[0].update(_parse_position([t for i, t in enumerate(tokens) if i not in used], text))
    stated = [a for a in ATTRIBUTES[:4] if any(a in o for o in objects)]
    stated += ["relation"] * (relation is not None) + ["background"] * (background is not None)
    heldout = any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in objects)
    return dict(objects=objects, relation=relation, background=background, stated=stated, heldout=heldout)


def _parse_background(tokens: list[str], used: set[int], text: str) -> str | None:
    backgrounds = _invert(BACKGROUND_WORDS)
    for i, t in enumerate(tokens):
        if t == "background":
            # "<bg> background" or "background is <bg>"
            for j in (i - 1, i + 2 if tokens[i + 1 : i + 2] == ["is"] else -1):
                if 0 <= j < len(tokens) and (tokens[j],) in backgrounds:
                    used |= {i, j}
                    return backgrounds[(tokens[j],)]
            raise ValueError(f"unknown background in {text!r}; backgrounds are {tuple(BACKGROUNDS)}")
    return None


def _parse_relation(between: list[str], text: str) -> str:
    relation_of = {w.split()[-2 if w.endswith(" of") else -1]: r for r, ws in RELATION_WORDS.items() for w in ws}
    found = [relation_of[t] for t in between if t in relation_of]
    if len(found) != 1:
        raise ValueError(f"two objects need exactly one relation {RELATIONS} between them in {text!r}")
    return found[0]


def _parse_position(words: list[str], text: str) -> dict:
    row_of, col_of = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}, {"left": 0, "right": 2}
    rows = {row_of[w] for w in words if w in row_of}
    cols = {col_of[w] for w in words if w in col_of}
    if len(rows) > 1 or len(cols) > 1:
        raise ValueError(f"conflicting positions in {text!r}")
    if not (rows or cols or {"center", "centre", "middle"} & set(words)):
        return {}
    row, col = (rows or {1}).pop(), (cols or {1}).pop()
    return {"position": POSITIONS[3 * row + col], "row": row, "col": col}


# -------------------------------------------------------------------------------------------------- writer
@dataclass
class ShapesOptions:
    """Everything the dataset's bytes depend on (``ensure_shapes`` regenerates when any of it changes)."""

    num_train: int = 20_000
    num_val: int = 1_000
    num_heldout: int = 1_000
    shard_size: int = 1_000  # samples per shard, <= 10000 (keys hold a 4-digit index in the shard)
    image_size: int = 256  # pixels per side
    seed: int = 0
    image_format: str = "jpg"  # "jpg" (quality 95, 4:4:4 chroma) or "png"
    max_objects: int = 2  # 1: single-object scenes only (a simpler grammar)
    sizes: tuple[str, ...] = tuple(SIZES)  # the object sizes drawn (a subset: a simpler grammar)

    def __post_init__(self) -> None:
        self.sizes = tuple(self.sizes)
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        if not self.sizes or set(self.sizes) - set(SIZES):
            raise ValueError(f"sizes must be a non-empty subset of {tuple(SIZES)}, got {self.sizes}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.shard_size <= 10_000:
            raise ValueError(f"shard_size must be in [1, 10000] (keys hold a 4-digit index), got {self.shard_size}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 so small objects stay readable, got {self.image_size}")
        if min(self.num_train, self.num_val, self.num_heldout) < 0:
            raise ValueError("sample counts must be >= 0")

    def num_samples(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "heldout": self.num_heldout}[split]

    def num_shards(self, split: str) -> int:
        return -(-self.num_samples(split) // self.shard_size)


def make_sample(seed: int, split: str, index: int, image_size: int = 256, max_objects: int = 2,
                sizes: Sequence[str] = tuple(SIZES)) -> tuple[Image.Image, str, dict]:
    """One sample: (PIL RGB image, caption, attributes incl. ``stated``), a pure function of its inputs."""
    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng, split, max_objects, sizes)
    caption, stated = make_caption(rng, scene)
    return render_pil(scene, image_size), caption, {**scene, "stated": stated}


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":  # 4:4:4 chroma: 4:2:0 would smear one-pixel colour edges
        image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tar_header(name: str, size: int) -> bytes:
    """POSIX ustar header (512 bytes) of a regular file with fixed metadata: mode 0644, uid/gid 0, empty
    user/group names, mtime ``TAR_MTIME``. Hand-written because ``tarfile`` costs ~0.1 ms a member."""
    fields = (
        name.encode().ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0",  # name mode uid gid
        b"%011o\0" % size, b"%011o\0" % TAR_MTIME, b" " * 8, b"0", b"\0" * 100,  # size mtime chksum type link
        b"ustar\x0000", b"\0" * 64, b"0000000\0" * 2,  # magic+version, uname+gname, devmajor+devminor
    )
    header = b"".join(fields).ljust(512, b"\0")
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]  # checksum, counted with blanks in place


class _TarShard:
    """Minimal deterministic tar writer (regular files only); tarfile, webdataset and GNU tar read it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _TarShard:
        self.file = open(self.path, "wb")  # closed in __exit__
        return self

    def add(self, name: str, data: bytes) -> None:
        self.file.write(_tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512))

    def __exit__(self, *exc_info) -> None:
        self.file.write(b"\0" * 1024)  # end-of-archive marker
        self.file.write(b"\0" * (-self.file.tell() % 10240))  # whole tar records, like GNU tar
        self.file.close()


def write_shard(out_dir: str | os.PathLike, split: str, shard: int, options: ShapesOptions) -> dict:
    """Write ``{out_dir}/{split}/{shard:05d}.tar`` and ``{shard:05d}_stats.json``; returns the stats."""
    split_dir, size = Path(out_dir) / split, options.image_size
    start = shard * options.shard_size
    count = min(options.shard_size, options.num_samples(split) - start)
    with _TarShard(split_dir / f"{shard:05d}.tar") as tar:
        for i in range(count):
            image, caption, attributes = make_sample(options.seed, split, start + i, size, options.max_objects,
                                                     options.sizes)
            key = f"{shard:05d}{i:04d}"
            meta = dict(key=key, caption=caption, status="success", error_message=None, width=size, height=size,
                        original_width=size, original_height=size, split=split, attributes=attributes)
            tar.add(f"{key}.{options.image_format}", _encode(image, options.image_format))
            tar.add(f"{key}.txt", caption.encode())
            tar.add(f"{key}.json", json.dumps(meta).encode())
    stats = dict(count=count, successes=count, failed_to_download=0, failed_to_resize=0,
                 status_dict={"success": count}, split=split, shard=shard)
    (split_dir / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _write_shard_task(task: tuple) -> dict:
    return write_shard(*task)


def write_shapes(out_dir: str | os.PathLike, num_train: int = 20_000, num_val: int = 1_000,
                 num_heldout: int = 1_000, shard_size: int = 1_000, image_size: int = 256, seed: int = 0,
                 image_format: str = "jpg", max_objects: int = 2, sizes: Sequence[str] = tuple(SIZES),
                 num_workers: int = 1, progress: bool = True) -> dict:
    """Generate the dataset into ``out_dir`` (img2dataset layout) and return its manifest.

    ``manifest.json`` is written last, so a folder without one is incomplete. The bytes depend only on the
    options, never on ``num_workers`` (each worker process writes whole shards).
    """
    options = ShapesOptions(num_train, num_val, num_heldout, shard_size, image_size, seed, image_format, max_objects,
                            tuple(sizes))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    tasks = []
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        tasks += [(out, split, shard, options) for shard in range(options.num_shards(split))]
    total = sum(options.num_samples(split) for split in SPLITS)
    with tqdm(total=total, disable=not progress, unit="img", desc="shapes", smoothing=0.1) as bar:
        if num_workers <= 1:
            for task in tasks:
                bar.update(_write_shard_task(task)["count"])
        else:
            with ProcessPoolExecutor(num_workers) as pool:
                for stats in pool.map(_write_shard_task, tasks):
                    bar.update(stats["count"])
    manifest = {
        "name": "shapes", "generator_version": GENERATOR_VERSION, "seed": seed, "options": asdict(options),
        "splits": {s: {"num_samples": options.num_samples(s), "num_shards": options.num_shards(s)} for s in SPLITS},
        "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
        "vocabulary": {"shapes": list(SHAPES), "colours": COLOURS, "backgrounds": BACKGROUNDS, "sizes": SIZES,
                       "positions": list(POSITIONS), "relations": list(RELATIONS)},
        "layout": "{split}/{shard:05d}.tar: {key}." + image_format + ", {key}.txt, {key}.json",
    }
    text = json.dumps(manifest, indent=2)
    (out / "manifest.json").write_text(text)
    return json.loads(text)  # as read back: lists, not tuples


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The dataset's manifest, or None when missing or unreadable (an incomplete or foreign folder)."""
    try:
        return json.loads((Path(out_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_current(manifest: dict | None, options: ShapesOptions) -> bool:
    if manifest is None or manifest.get("generator_version") != GENERATOR_VERSION:
        return False
    return manifest.get("options") == json.loads(json.dumps(asdict(options)))  # as the manifest stores it


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) held for the block; waits while another process holds it."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_shapes(out_dir: str | os.PathLike, num_train: int = 20_000, num_val: int = 1_000,
                  num_heldout: int = 1_000, shard_size: int = 1_000, image_size: int = 256, seed: int = 0,
                  image_format: str = "jpg", max_objects: int = 2, sizes: Sequence[str] = tuple(SIZES),
                  num_workers: int = 1, progress: bool = True, force: bool = False) -> dict:
    """Return the manifest of ``out_dir``, generating the dataset first when it is missing, incomplete,
    was made with other options or another generator version, or when ``force``.

    Generation goes to a temporary sibling folder renamed into place, so an interrupted run never leaves a
    folder that looks complete. A lock file beside ``out_dir`` makes concurrent calls safe: the second
    waits, then finds the dataset ready. A non-empty ``out_dir`` that is not a shapes dataset is never
    replaced.
    """
    options = ShapesOptions(num_train, num_val, num_heldout, shard_size, image_size, seed, image_format, max_objects,
                            tuple(sizes))
    out = Path(out_dir).absolute()
    manifest = read_manifest(out)
    if not force and _is_current(manifest, options):
        return manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(f".{out.name}.lock")):
        manifest = read_manifest(out)
        if not force and _is_current(manifest, options):
            return manifest  # made by another process while we waited
        if out.exists() and any(out.iterdir()) and not _looks_like_shapes(out, manifest):
            raise FileExistsError(f"{out} exists and is not a shapes dataset; refusing to replace it")
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by interrupted runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        manifest = write_shapes(tmp, **asdict(options), num_workers=num_workers, progress=progress)
        if out.exists():
            old = out.with_name(f".{out.name}.tmp-old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    return manifest


def _looks_like_shapes(out: Path, manifest: dict | None) -> bool:
    """A shapes dataset, possibly incomplete: a shapes manifest, or only split folders and no other files."""
    if manifest is not None:
        return manifest.get("name") == "shapes"
    return all(p.name in SPLITS and p.is_dir() for p in out.iterdir())


# ----------------------------------------------------------------------------------------------------- CLI
@dataclass
class ShapesConfig(ShapesOptions):
    """Options of ``python -m unclip.data.shapes key=value ...``; see ``ensure_shapes``."""

    out_dir: str = "data/shapes"
    num_workers: int = 1
    progress: bool = True
    force: bool = False


def main() -> None:
    """Hydra entry point. Hydra's run folder, log files and working-directory change are switched off:
    this tool writes only ``out_dir``."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="shapes_schema", node=ShapesConfig)
    store.store(name="shapes", node={
        "defaults": ["shapes_schema", "_self_", {"override hydra/job_logging": "none"},
                     {"override hydra/hydra_logging": "none"}],
        "hydra": {"run": {"dir": "."}, "output_subdir": None, "job": {"chdir": False}},
    })

    @hydra.main(version_base="1.3", config_path=None, config_name="shapes")
    def run(cfg) -> None:
        manifest = ensure_shapes(**asdict(OmegaConf.to_object(cfg)))
        counts = ", ".join(f"{s} {v['num_samples']}" for s, v in manifest["splits"].items())
        print(f"shapes dataset ready in {cfg.out_dir} ({counts})")

    run()


if __name__ == "__main__":
    main()
