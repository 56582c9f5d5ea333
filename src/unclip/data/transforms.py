"""Image decoding and the crop/resize/flip transforms, in PIL on uint8 (the float conversion is batched).

All outputs of one sample come from the same square crop of the source image, so `image`,
`lowres_image` and `clip_image` stay aligned pixel for pixel (up to resampling):

    source (w, h) --square box of side min(w, h), random or centred--> image       (S, S)
                                                                    -> clip_image  (C, C)
                                         image --antialiased resize-> lowres_image (s, s)
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unclip.data.errors import SkipSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Formats PIL may try: restricting the probe is faster and keeps exotic decoders off untrusted bytes.
# MPO is what older Pillow versions call the multi-picture JPEGs many cameras write (newer ones say JPEG).
Image.init()
PIL_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP") if f in Image.OPEN)
# resize(reducing_gap=3) first shrinks by an integer factor with a box filter, then resamples; the result
# is indistinguishable from a full bicubic resize (PIL docs) and much faster on large sources.
REDUCING_GAP = 3.0
# PIL's own default limit (Image.MAX_IMAGE_PIXELS): ~0.27 GB of decoded RGB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def open_image(data: bytes, min_size: int, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image whose shorter side is >= `min_size` where the source allows.

    JPEGs are decoded with `draft`, which lets libjpeg scale by 1/2, 1/4 or 1/8 during the inverse DCT:
    decoding a 1024 px photo for a 64 px target costs a fraction of a full decode. Images with more than
    `max_pixels` pixels are refused from their header, before any pixel is decoded (decompression bombs).
    Raises `SkipSample("corrupt_image" | "oversized_image")`.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exn:
        raise SkipSample("oversized_image", str(exn)) from None
    except Exception as exn:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, struct.error...
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("oversized_image", f"{width}x{height} pixels > max_image_pixels={max_pixels}")
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (min_size, min_size))  # keeps both sides >= min_size
    try:
        image.load()
        return to_rgb(image)
    except Exception as exn:  # truncated or corrupt pixel data
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited over white rather than black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def square_box(width: int, height: int, rng: random.Random | None) -> tuple[float, float, float, float]:
    """The largest square inside (width, height): random along the longer side if `rng`, else centred.

    Equivalent to "resize the shorter side to the target, then crop", without resampling the margins.
    """
    side = min(width, height)
    slack_x, slack_y = width - side, height - side
    x0 = rng.uniform(0, slack_x) if rng is not None and slack_x else slack_x / 2
    y0 = rng.uniform(0, slack_y) if rng is not None and slack_y else slack_y / 2
    return (x0, y0, x0 + side, y0 + side)


@dataclass(frozen=True)
class ImageTransform:
    """Bytes -> aligned uint8 arrays (H, W, 3): `image` (S, S) and optionally `lowres_image`, `clip_image`.

    Args:
        image_size: S, the side of `image`.
        lowres_size: side of `lowres_image` (< S), downsampled from `image`; None to skip.
        clip_image_size: side of `clip_image`, resampled from the same source crop; None to skip.
        random_crop: random square crop position (training); else centred.
        random_flip: horizontal flip with probability 1/2 (the same flip for every output).
        max_image_pixels: larger images are skipped as "oversized_image".
    """

    image_size: int
    lowres_size: int | None = None
    clip_image_size: int | None = None
    random_crop: bool = False
    random_flip: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, data: bytes, rng: random.Random) -> dict[str, np.ndarray]:
        work_size = max(self.image_size, self.clip_image_size or 0)
        source = open_image(data, work_size, self.max_image_pixels)
        box = square_box(*source.size, rng if self.random_crop else None)
        image = _resize(source, self.image_size, box)
        out = {"image": image}
        if self.clip_image_size is not None:
            same = self.clip_image_size == self.image_size
            out["clip_image"] = image if same else _resize(source, self.clip_image_size, box)
        if self.lowres_size is not None:
            out["lowres_image"] = _resize(image, self.lowres_size, None)
        flip = self.random_flip and rng.random() < 0.5
        return {name: _array(im, flip) for name, im in out.items()}


def _resize(image: Image.Image, size: int, box: tuple[float, float, float, float] | None) -> Image.Image:
    """Antialiased bicubic resize of `box` (whole image if None) to (size, size)."""
    if box is None and image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)


def _array(image: Image.Image, flip: bool) -> np.ndarray:
    """PIL RGB -> contiguous uint8 array (H, W, 3), optionally mirrored left-right.

    The flip happens in PIL: a negatively strided numpy view would make batching ~50x slower.
    """
    return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
