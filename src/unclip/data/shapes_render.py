"""Antialiased rasterizer for the `shapes` dataset: signed distance -> coverage -> alpha compositing.

Every shape lives in the unit box [-0.5, 0.5]^2 around its centre (x right, y down) and is scaled by
``scale`` pixels, the side of that box. The coverage of a pixel is taken from the signed distance d (in
pixels, negative inside) at the pixel centre: ``clip(0.5 - d, 0, 1)``. That is the exact area coverage of
a straight edge crossing the pixel parallel to its sides and within a few percent for other angles, which
is all antialiasing needs. Distances are evaluated only inside each object's bounding box, and the flat
colour is blended in by PIL's ``paste`` with the coverage as mask, so a 256 px scene costs well under a
millisecond on one core.

Distances are written for numpy broadcasting: ``u`` has shape (1, w) and ``v`` (h, 1), so part of the
work happens on rows and columns before the first (h, w) array appears. Convex polygons use the maximum
of their edge half-planes (exact zero set and exact distance along edges, mitred within a pixel of the
corners); the circle and the star use exact Euclidean distances.

Shapes and their geometry (unit box, ``scale`` = 1):

========  ==================================================================================
circle    radius 0.5
square    side 0.9
triangle  equilateral, side 1, pointing up, its bounding box centred (centroid 0.144 below)
star      5 points, outer radius 0.5, inner radius 0.225, pointing up, centred on its centre
diamond   square rotated 45 degrees, diagonals 1
cross     plus sign, arms 1 long and 0.36 wide
========  ==================================================================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

# Chromatic object colours, chosen to stay far apart in RGB (>= 92 between any two, orange-yellow) and
# >= 99 from every background (purple-gray), so a pixel reader can name them after JPEG, downsampling
# and model error.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (245, 120, 190),
}
# Neutral backgrounds.
BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}

_SQRT1_2 = math.sqrt(0.5)
_SQRT3 = math.sqrt(3.0)
TRIANGLE_SIDE = 1.0
STAR_INNER_RATIO = 0.45  # inner / outer radius; 0.38 is the regular pentagram, fatter reads better at 64 px
CROSS_HALF_WIDTH = 0.18
SQUARE_HALF_SIDE = 0.45

Array = np.ndarray


def sd_circle(u: Array, v: Array) -> Array:
    return np.sqrt(u * u + v * v) - 0.5  # (h, w); sqrt of squares beats np.hypot ~5x


def sd_square(u: Array, v: Array) -> Array:
    return np.maximum(np.abs(u), np.abs(v)) - SQUARE_HALF_SIDE


def sd_diamond(u: Array, v: Array) -> Array:
    return (np.abs(u) + np.abs(v) - 0.5) * _SQRT1_2


def sd_cross(u: Array, v: Array) -> Array:
    au, av = np.abs(u), np.abs(v)  # (1, w), (h, 1)
    horizontal_bar = np.maximum(au - 0.5, av - CROSS_HALF_WIDTH)
    vertical_bar = np.maximum(au - CROSS_HALF_WIDTH, av - 0.5)
    return np.minimum(horizontal_bar, vertical_bar)


def sd_triangle(u: Array, v: Array) -> Array:
    """Equilateral triangle pointing up: max of its three edge half-planes (sides folded by |u|)."""
    half_height = TRIANGLE_SIDE * _SQRT3 / 4
    # Right side runs from the apex (0, -half_height) to (side / 2, half_height); unit outward normal
    # (cos 30, -sin 30).
    side = (_SQRT3 / 2) * np.abs(u) - 0.5 * (v + half_height)  # (h, w)
    return np.maximum(side, v - half_height)


_COS36, _SIN36 = math.cos(math.pi / 5), math.sin(math.pi / 5)


def sd_star(u: Array, v: Array) -> Array:
    """5-pointed star, one point up: exact distance after folding the plane into one tenth.

    Two reflections across the star's mirror axes bring every point into the sector of the top point;
    what remains is the distance to the segment from the tip to the next inner vertex.
    """
    r = 0.5
    x, y = np.abs(u), -v  # (1, w), (h, 1); y up
    for kx in (_COS36, -_COS36):  # mirror normals (+-cos 36, -sin 36)
        m = np.maximum((2 * kx) * x - (2 * _SIN36) * y, 0.0)  # (h, w): twice the distance past the mirror
        x, y = x - m * kx, y + m * _SIN36
    x = np.abs(x)
    y = y - r
    # Tip (0, r) to inner vertex r * ratio * (sin 36, cos 36): direction b = (bx, by) per unit of h.
    bx, by = STAR_INNER_RATIO * _SIN36, STAR_INNER_RATIO * _COS36 - 1.0
    h = np.clip((x * bx + y * by) * (1.0 / (bx * bx + by * by)), 0.0, r)
    dx, dy = x - bx * h, y - by * h
    return np.copysign(np.sqrt(dx * dx + dy * dy), y * bx - x * by)  # negative inside


SDF: dict[str, Callable[[Array, Array], Array]] = {
    "circle": sd_circle,
    "square": sd_square,
    "triangle": sd_triangle,
    "star": sd_star,
    "diamond": sd_diamond,
    "cross": sd_cross,
}
SHAPES: tuple[str, ...] = tuple(SDF)


def _distance_box(
    shape: str, cx: float, cy: float, scale: float, height: int, width: int
) -> tuple[Array, int, int]:
    """Signed distance in unit-box units (h, w) over the shape's bounding box plus 1 px, clipped."""
    half = 0.5 * scale + 1.0
    x0, x1 = max(math.floor(cx - half), 0), min(math.ceil(cx + half), width)
    y0, y1 = max(math.floor(cy - half), 0), min(math.ceil(cy + half), height)
    inv = 1.0 / scale
    u = ((np.arange(x0, x1, dtype=np.float32) + (0.5 - cx)) * inv)[None, :]  # (1, w) unit coords
    v = ((np.arange(y0, y1, dtype=np.float32) + (0.5 - cy)) * inv)[:, None]  # (h, 1)
    return SDF[shape](u, v), y0, x0


def coverage(
    shape: str, cx: float, cy: float, scale: float, height: int, width: int
) -> tuple[Array, int, int]:
    """Antialiased coverage of one shape over its (clipped) bounding box.

    Args:
        shape: a name in ``SHAPES``.
        cx, cy: centre of the shape's unit box in pixels (x right, y down; pixel i spans [i, i+1)).
        scale: side of the unit box in pixels.
        height, width: image size in pixels.

    Returns:
        (alpha, y0, x0): alpha is float32 (h, w) in [0, 1] for rows y0:y0+h and columns x0:x0+w.
    """
    d, y0, x0 = _distance_box(shape, cx, cy, scale, height, width)
    return np.clip(0.5 - d * scale, 0.0, 1.0), y0, x0


def background_image(background: str, image_size: int) -> Image.Image:
    """A flat RGB PIL image of a named background."""
    return Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])


def paste_object(image: Image.Image, shape: str, colour: str, center: Sequence[float], scale: float) -> None:
    """Alpha-blend one flat-coloured shape into a PIL RGB image in place.

    ``center`` ([x, y]) and ``scale`` (side of the unit box) are fractions of the image side.
    """
    size = image.width
    d, y0, x0 = _distance_box(shape, center[0] * size, center[1] * size, scale * size, image.height, size)
    # 255 * clip(0.5 - d_px, 0, 1), rounded: the coverage as an 8-bit mask.
    mask = np.clip(128.0 - d * (255.0 * scale * size), 0.0, 255.0).astype(np.uint8)  # (h, w)
    h, w = mask.shape
    tile = Image.new("RGB", (w, h), COLOURS[colour])
    image.paste(tile, (x0, y0), Image.frombuffer("L", (w, h), mask, "raw", "L", 0, 1))


def render_pil(scene: dict, image_size: int = 256) -> Image.Image:
    """Render a scene (the ``attributes`` dict of a sample) to a PIL RGB image of side ``image_size``.

    Uses ``scene["background"]`` and, per object, ``shape``, ``colour``, ``center`` ([x, y] as fractions
    of the image side) and ``scale`` (side of the unit box as a fraction of the image side).
    """
    image = background_image(scene["background"], image_size)
    for obj in scene["objects"]:
        paste_object(image, obj["shape"], obj["colour"], obj["center"], obj["scale"])
    return image


def render_scene(scene: dict, image_size: int = 256) -> Array:
    """Render a scene to uint8 (image_size, image_size, 3); see ``render_pil``."""
    return np.asarray(render_pil(scene, image_size)).copy()


@functools.cache
def shape_moments(shape: str, resolution: int = 512) -> tuple[float, float, float]:
    """(area, centroid_x, centroid_y) of a shape in unit-box units, measured on a fine raster."""
    c = resolution / 2
    alpha, y0, x0 = coverage(shape, c, c, float(resolution), resolution + 4, resolution + 4)
    mass = float(alpha.sum())
    ys = (np.arange(alpha.shape[0]) + y0 + 0.5 - c) / resolution
    xs = (np.arange(alpha.shape[1]) + x0 + 0.5 - c) / resolution
    cx = float((alpha.sum(0) * xs).sum() / mass)
    cy = float((alpha.sum(1) * ys).sum() / mass)
    return mass / resolution**2, cx, cy
