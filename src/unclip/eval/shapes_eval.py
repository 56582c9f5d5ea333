"""ShapesEval: read the `shapes` attributes back from images by pixel analysis (no learned model).

Per image (``read_scene``):
1. background = per-channel median of the one-pixel border, named by the nearest of ``BACKGROUNDS``;
2. foreground = pixels farther than ``FOREGROUND_DISTANCE`` (RGB, 0..255) from the background; 8-connected
   components (scipy.ndimage), specks below ``MIN_AREA_FRACTION`` of the image dropped;
3. per component: colour = the named colour whose line from the background best explains its pixels
   (``p ~ bg + alpha * (c - bg)``, alpha in [0, 1]), so partially covered edge pixels vote correctly;
   coverage alpha = projection onto the measured object colour;
4. shape = the template, rendered by the generator's own rasterizer with the component's mass (-> scale)
   and centroid (-> centre), that best matches alpha (relative L1 error; above ``MAX_SHAPE_ERROR`` the
   shape is None); size = nearest size class (log scale) of that scale; position = 3x3 cell of the centre.

Scoring (``score_scene``) matches detected objects to the caption's objects (the assignment that makes the
most stated attributes true) and checks only what the caption states. "A left of B" holds when A's centre
is more than ``RELATION_MARGIN`` of the image side left of B's (likewise right of / above / below).
``count`` (right number of objects) is always checked; ``all`` = count and every stated attribute right.
Samples count as held-out when an object's colour-shape pair is in ``HELDOUT_PAIRS``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from unclip.data.shapes import HELDOUT_PAIRS, HORIZONTAL_RELATIONS, POSITIONS, SIZES, parse_caption
from unclip.data.shapes_render import BACKGROUNDS, COLOURS, SHAPES, coverage, shape_moments

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background; the weakest object contrast is ~100
MIN_AREA_FRACTION = 0.0012  # of the image; the smallest object (small star) covers ~0.0045
MAX_OBJECTS = 6  # largest components kept per image
MAX_SHAPE_ERROR = 0.5  # relative L1 between coverage and best template above which no shape is named
RELATION_MARGIN = 0.1  # of the image side; the generator's relations are >= 0.17 apart
SCORED: tuple[str, ...] = ("colour", "shape", "size", "position", "relation", "background", "count", "all")
# The smallest image side at which each attribute is read right on >= 98% of the generator's own images
# (tests/test_shapes_eval.py): below MIN_SIDE nothing is judged; below SHAPE_MIN_SIDE the shape (and so
# "all") is not, since a small star is 4 px wide at 32 px (shape is read right on ~91% there).
MIN_SIDE = 32
SHAPE_MIN_SIDE = 48

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (K, 3)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float32)
_LOG_SIZES = np.log(np.array(list(SIZES.values())))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def to_hwc(image) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 255].

    Accepts uint8 (H, W, 3) arrays / tensors, float (3, H, W) arrays / tensors in [-1, 1], PIL images.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.floating) and image.ndim == 3 and image.shape[0] == 3:
        return ((np.clip(image.transpose(1, 2, 0), -1.0, 1.0) + 1.0) * 127.5).astype(np.float32)
    raise TypeError(f"expected uint8 (H, W, 3) or float (3, H, W) in [-1, 1], got {image.dtype} {image.shape}")


def read_scene(image) -> dict:
    """Attributes read from one image (see ``to_hwc`` for accepted inputs).

    Returns ``{"background", "objects": [...]}``; objects (largest first) have ``shape`` (None when no
    template fits), ``colour``, ``size``, ``row``, ``col``, ``position``, ``center`` ([x, y]) and ``scale``
    (fractions of the image side, like the generator's json) and ``shape_error``.
    """
    return _read_rgb(to_hwc(image))


def _read_rgb(rgb: np.ndarray) -> dict:
    """``read_scene`` of a float32 (H, W, 3) image in [0, 255]."""
    height, width = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (2H + 2W, 3)
    background = np.median(border, axis=0).astype(np.float32)
    diff = rgb - background  # (H, W, 3)
    foreground = np.einsum("hwc,hwc->hw", diff, diff) > FOREGROUND_DISTANCE**2
    labels, _ = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    keep = [k for k in np.argsort(-areas)[:MAX_OBJECTS] if areas[k] >= MIN_AREA_FRACTION * height * width]
    slices = ndimage.find_objects(labels)
    objects = [_read_object(diff, background, labels, int(k), slices[k - 1]) for k in keep]
    name = _BACKGROUND_NAMES[int(np.argmin(((_BACKGROUND_RGB - background) ** 2).sum(1)))]
    return {"background": name, "objects": objects}


def _read_object(
    diff: np.ndarray, background: np.ndarray, labels: np.ndarray, label: int, box: tuple[slice, slice]
) -> dict:
    """Colour, coverage and best template of one component (``diff`` = image - background)."""
    height, width = labels.shape
    y0, x0 = max(box[0].start - 2, 0), max(box[1].start - 2, 0)
    y1, x1 = min(box[0].stop + 2, height), min(box[1].stop + 2, width)
    own = labels[y0:y1, x0:x1]
    # Grow the component by a pixel to take in its faint antialiased rim, but not a neighbour's pixels.
    region = ndimage.binary_dilation(own == label, structure=_EIGHT_CONNECTED) & ((own == 0) | (own == label))
    pixels = diff[y0:y1, x0:x1][region]  # (N, 3), relative to the background
    colour = _name_colour(pixels, background)
    named = _COLOUR_RGB[_COLOUR_NAMES.index(colour)] - background
    core = pixels[pixels @ named >= 0.9 * float(named @ named)]  # pixels at least 90% covered
    direction = np.median(core, axis=0) if len(core) >= 3 else named  # measured colour - background
    alpha = np.zeros(own.shape, dtype=np.float32)
    alpha[region] = np.clip(pixels @ direction / max(float(direction @ direction), 1.0), 0.0, 1.0)
    if float(alpha.sum()) < 1.0:  # no pixel leans towards the named colour (a generated blob of no real
        alpha[region] = 1.0      # colour): read its place and size from the component itself
    shape, scale, cx, cy, error = _fit_template(alpha, y0, x0, height, width)
    side = math.sqrt(height * width)
    row, col = min(max(int(3 * cy / height), 0), 2), min(max(int(3 * cx / width), 0), 2)
    size = tuple(SIZES)[int(np.argmin(np.abs(_LOG_SIZES - math.log(max(scale / side, 1e-6)))))]
    return dict(
        shape=shape,
        colour=colour,
        size=size,
        row=row,
        col=col,
        position=POSITIONS[3 * row + col],
        center=[cx / width, cy / height],
        scale=scale / side,
        shape_error=error,
    )


def _name_colour(pixels: np.ndarray, background: np.ndarray) -> str:
    """The named colour whose segment from the background (alpha in [0, 1]) best explains ``pixels``
    (N, 3, relative to the background)."""
    pixels = pixels[:: max(len(pixels) // 4096, 1)]  # a large blob needs no more votes than this
    directions = _COLOUR_RGB - background  # (K, 3)
    norms = np.maximum((directions**2).sum(1), 1.0)  # (K,)
    dots = pixels @ directions.T  # (N, K)
    alpha = np.clip(dots / norms, 0.0, 1.0)
    # sum |p - alpha d|^2 = sum |p|^2 + alpha (alpha |d|^2 - 2 p.d); the first term is the same for all k
    return _COLOUR_NAMES[int(np.argmin((alpha * (alpha * norms - 2.0 * dots)).sum(0)))]


def _fit_template(alpha: np.ndarray, y0: int, x0: int, height: int, width: int):
    """Best shape for a coverage map ``alpha`` (h, w) placed at (y0, x0) of an (height, width) image.

    Each shape's template gets the scale that matches alpha's mass and the centre that matches its
    centroid. Returns (shape or None, scale_px, box centre x, box centre y, relative L1 error).
    """
    mass = float(alpha.sum())
    if mass <= 0.0:  # nothing covered: no shape, centred in the map
        return None, 0.0, x0 + alpha.shape[1] / 2, y0 + alpha.shape[0] / 2, math.inf
    ys = np.arange(alpha.shape[0], dtype=np.float32) + (y0 + 0.5)
    xs = np.arange(alpha.shape[1], dtype=np.float32) + (x0 + 0.5)
    mx, my = float(alpha.sum(0) @ xs) / mass, float(alpha.sum(1) @ ys) / mass  # centroid, pixels
    best = (math.inf, None, 0.0, mx, my)
    for shape in SHAPES:
        area, ox, oy = shape_moments(shape)
        scale = math.sqrt(mass / area)
        cx, cy = mx - ox * scale, my - oy * scale
        template, ty0, tx0 = coverage(shape, cx, cy, scale, height, width)
        error = _l1_between(alpha, y0, x0, template, ty0, tx0) / mass
        if error < best[0]:
            best = (error, shape, scale, cx, cy)
    error, shape, scale, cx, cy = best
    return (shape if error <= MAX_SHAPE_ERROR else None), scale, cx, cy, error


def _l1_between(a: np.ndarray, ay: int, ax: int, b: np.ndarray, by: int, bx: int) -> float:
    """Sum of |a - b| for two maps placed at different offsets (zero outside each)."""
    y0, x0 = min(ay, by), min(ax, bx)
    y1, x1 = max(ay + a.shape[0], by + b.shape[0]), max(ax + a.shape[1], bx + b.shape[1])
    canvas = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    canvas[ay - y0 : ay - y0 + a.shape[0], ax - x0 : ax - x0 + a.shape[1]] = a
    canvas[by - y0 : by - y0 + b.shape[0], bx - x0 : bx - x0 + b.shape[1]] -= b
    return float(np.abs(canvas).sum())


# ---------------------------------------------------------------------------------------------- scoring
def _target(meta: dict | str) -> dict:
    """The stated attributes: a caption, a sample's json, its ``attributes``, or ``parse_caption`` output."""
    if isinstance(meta, str):
        return parse_caption(meta)
    target = meta.get("attributes", meta)
    if "objects" not in target:
        raise ValueError(f"expected a shapes caption, sample json or its 'attributes', got keys {sorted(meta)}")
    if "stated" not in target:  # a hand-made dict: everything it holds is stated
        stated = [a for a in ("shape", "colour", "size", "position") if any(a in o for o in target["objects"])]
        stated += [a for a in ("relation", "background") if target.get(a) is not None]
        target = {**target, "stated": stated}
    return target


def relation_true(relation: str, a: dict, b: dict, margin: float = RELATION_MARGIN) -> bool:
    """Whether detected object ``a`` is `relation` ``b``, from their centres (fractions of the side)."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation] > margin


def _object_checks(found: dict | None, wanted: dict, stated: Sequence[str]) -> dict[str, bool]:
    checks = {}
    for attr in ("colour", "shape", "size", "position"):
        if attr in stated and attr in wanted:
            checks[attr] = found is not None and found[attr] == wanted[attr]
    return checks


def score_scene(read: dict, meta: dict | str) -> dict[str, bool]:
    """Which stated attributes an image gets right: ``read`` from ``read_scene``, ``meta`` as in
    ``_target``. Keys: the stated ones of ``colour shape size position relation background``, plus
    ``count`` and ``all``."""
    target = _target(meta)
    stated, wanted = target["stated"], target["objects"]
    found = read["objects"]
    candidates = list(range(len(found))) + [None] * len(wanted)  # None: the object was not found
    best: dict[str, bool] | None = None
    for assignment in itertools.permutations(candidates, len(wanted)):
        matched = [None if i is None else found[i] for i in assignment]
        checks: dict[str, bool] = {}
        for obj, want in zip(matched, wanted):
            for attr, ok in _object_checks(obj, want, stated).items():
                checks[attr] = checks.get(attr, True) and ok
        if "relation" in stated:
            checks["relation"] = None not in matched and relation_true(target["relation"], *matched)
        if best is None or sum(checks.values()) > sum(best.values()):
            best = checks
    result = dict(best or {})
    if "background" in stated:
        result["background"] = read["background"] == target["background"]
    result["count"] = len(found) == len(wanted)
    result["all"] = all(result.values())
    return result


def is_heldout(meta: dict | str) -> bool:
    """Whether a caption or sample names a held-out colour-shape pair."""
    return any((o.get("colour"), o.get("shape")) in HELDOUT_PAIRS for o in _target(meta)["objects"])


class ShapesEval:
    """Per-attribute and all-attribute accuracy, split into in-distribution and held-out captions.

    ``ShapesEval()(images, metas)`` scores one batch; ``update(images, metas)`` over many batches then
    ``compute()`` scores them all (``reset()`` starts over). ``images``: a float tensor (B, 3, H, W) in
    [-1, 1] or a list of images (see ``to_hwc``), at least ``MIN_SIDE`` px (a smaller image is an error);
    shape and all-attribute accuracy only from ``SHAPE_MIN_SIDE`` px, where they are trustworthy. ``metas``:
    per-sample json dicts, their ``attributes``, ``parse_caption`` outputs or captions. Keys of the result:
    ``indist/<attr>`` and ``heldout/<attr>`` for attr in ``SCORED`` (an attribute no caption states, or one
    not judged at this size, is left out), the same over both splits by the number of objects the caption
    names (``objects1/<attr>``, ``objects2/<attr>``), and ``n_indist``, ``n_heldout``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.count = {"indist": 0, "heldout": 0}
        self.scenes: list[dict] = []  # one record per image: see ``scene_record``

    def update(self, images, metas: Sequence[dict | str]) -> list[dict[str, bool]]:
        """Score a batch into the running totals; returns each sample's ``score_scene`` result."""
        if len(images) != len(metas):
            raise ValueError(f"got {len(images)} images but {len(metas)} metas")
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu()  # one device-to-host copy for the whole batch
        results = []
        for image, meta in zip(images, metas):
            target = _target(meta)  # parse a caption once
            rgb = to_hwc(image)
            side = min(rgb.shape[:2])
            if side < MIN_SIDE:
                raise ValueError(f"ShapesEval reads images of at least {MIN_SIDE} px, got {rgb.shape[1]}x{rgb.shape[0]}"
                                 f" (upsample the samples first, or judge the next stage's output)")
            read = _read_rgb(rgb)
            result = score_scene(read, target)
            if side < SHAPE_MIN_SIDE:  # not trustworthy at this size: left out, not guessed
                result = {k: v for k, v in result.items() if k not in ("shape", "all")}
            group = "heldout" if is_heldout(target) else "indist"
            self.scenes.append(scene_record(meta, target, read, result, group, side))
            self.count[group] += 1
            scene = f"objects{len(target['objects'])}"  # both splits: where one object is drawn and two are not
            for attr, ok in result.items():
                for key in (f"{group}/{attr}", f"{scene}/{attr}"):
                    self.total[key] = self.total.get(key, 0) + 1
                    self.correct[key] = self.correct.get(key, 0) + int(ok)
            results.append(result)
        return results

    def compute(self) -> dict[str, float]:
        out = {key: self.correct[key] / self.total[key] for key in sorted(self.total)}
        return out | {"n_indist": float(self.count["indist"]), "n_heldout": float(self.count["heldout"])}

    def breakdown(self) -> dict[str, float]:
        """``two_object_breakdown`` of every scene scored since the last ``reset``."""
        return two_object_breakdown(self.scenes)

    def __call__(self, images, metas: Sequence[dict | str]) -> dict[str, float]:
        """Scores of this batch alone (the running totals are left untouched)."""
        batch = ShapesEval()
        batch.update(images, metas)
        return batch.compute()


def scene_record(meta: dict | str, target: dict, read: dict, result: dict[str, bool], split: str, side: int) -> dict:
    """One judged image as plain JSON: its caption, split, what the caption asks (``wanted``, ``relation``,
    ``background``, ``stated``), what was read (``read``: background and objects) and the ``checks``."""
    caption = meta if isinstance(meta, str) else meta.get("caption")
    keep = ("colour", "shape", "size", "position", "center", "scale")
    objects = [{k: (np.round(o[k], 4).tolist() if k in ("center", "scale") else o[k]) for k in keep if k in o}
               for o in read["objects"]]
    return {"caption": caption, "split": split, "side": side, "stated": list(target["stated"]),
            "wanted": [{k: o.get(k) for k in ("colour", "shape", "size", "position")} for o in target["objects"]],
            "relation": target.get("relation"), "background": target.get("background"),
            "read": {"background": read["background"], "objects": objects}, "checks": dict(result)}


def two_object_breakdown(scenes: Sequence[dict]) -> dict[str, float]:
    """Where two-object scenes fail, from ``scene_record``s (keys without a scene to count are left out):

    ``objects2/found_<k>``: fraction of scenes in which k objects were read (k = 0, 1, 2, ``3plus``);
    ``objects2/relation_<kind>``: relation accuracy per kind ("left of" -> ``left_of``);
    ``objects2/colours_both_found``: fraction of scenes naming two different colours in which each is read
    on some object; among those, ``objects2/colours_placed`` (the relation holds between the objects of the
    two named colours: colour bound to place) and ``objects2/colours_reversed`` (it holds with the colours
    exchanged: each colour drawn where the other was asked), and both again per axis of the relation
    (``_left_right``, ``_above_below``).
    """
    two = [s for s in scenes if len(s["wanted"]) == 2]
    out: dict[str, float] = {}
    if not two:
        return out
    found = [min(len(s["read"]["objects"]), 3) for s in two]
    for k in range(4):
        out[f"objects2/found_{k}{'plus' if k == 3 else ''}"] = found.count(k) / len(two)
    kinds: dict[str, list[bool]] = {}
    for s in two:
        if s.get("relation") and "relation" in s["checks"]:
            kinds.setdefault(s["relation"].replace(" ", "_"), []).append(bool(s["checks"]["relation"]))
    out.update({f"objects2/relation_{k}": sum(v) / len(v) for k, v in sorted(kinds.items())})
    asked = [s for s in two if s.get("relation") and "colour" in s["stated"]
             and s["wanted"][0]["colour"] != s["wanted"][1]["colour"]]
    tally: dict[str, list[int]] = {}  # axis -> [scenes with both colours read, placed, reversed]
    for s in asked:
        by_colour = {}
        for o in s["read"]["objects"]:  # largest first: the largest object of each colour stands for it
            by_colour.setdefault(o["colour"], o)
        a, b = (by_colour.get(w["colour"]) for w in s["wanted"])
        if a is None or b is None:
            continue
        axis = "left_right" if s["relation"] in HORIZONTAL_RELATIONS else "above_below"
        for key in ("", "_" + axis):
            counts = tally.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += relation_true(s["relation"], a, b)
            counts[2] += relation_true(s["relation"], b, a)
    if asked:
        out["objects2/colours_both_found"] = tally.get("", [0])[0] / len(asked)
    for key, (both, placed, reversed_) in sorted(tally.items()):
        out[f"objects2/colours_placed{key}"] = placed / both
        out[f"objects2/colours_reversed{key}"] = reversed_ / both
    return out
