"""Raw WebDataset samples (dicts of member bytes) -> decoded samples -> batches (the batch contract).

A raw sample looks like {"__key__": "000123", "__url__": ..., "jpg": b"...", "txt": b"...",
"json": b"...", "cls": b"7", "image_embed.npy": b"..."}. Decoding raises `SkipSample(reason)` for
anything unusable; the pipeline's handler counts it.

Batch (B samples):
    image          float32 (B, 3, S, S) in [-1, 1]
    lowres_image   float32 (B, 3, s, s) in [-1, 1]     when lowres_size is set
    clip_image     float32 (B, 3, C, C) in [-1, 1]     when clip_image_size is set
    caption        list[str] (B)
    key            list[str] (B)
    meta           list[dict] (B)                       the sample's .json, else {}
    image_embed    (B, D), text_embed (B, D), text_tokens (B, L, W): stored dtype
    text_mask      bool (B, L)
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from unclip.data.errors import SkipSample
from unclip.data.text import class_caption, clean_caption
from unclip.data.transforms import IMAGE_EXTENSIONS, ImageTransform

PRECOMPUTED_FIELDS = ("image_embed", "text_embed", "text_tokens", "text_mask")
IMAGE_KEYS = ("image", "lowres_image", "clip_image")


@dataclass
class SampleDecoder:
    """Decode one raw sample; see the module docstring for the output fields.

    Args:
        caption_key: "txt" (or any member extension holding utf-8 text), "json:<field>", or "cls".
        transform: image transform, or None to skip image decoding entirely (load_image=False).
        precomputed: which of PRECOMPUTED_FIELDS to read from "<field>.npy" members.
        class_names, templates: for caption_key="cls".
        lowercase: lowercase captions after cleaning.
    """

    caption_key: str = "txt"
    transform: ImageTransform | None = None
    precomputed: Sequence[str] = ()
    class_names: Sequence[str] | None = None
    templates: Sequence[str] = ("{}",)
    lowercase: bool = False
    # First shape seen per precomputed field (per worker): a mismatching sample is skipped, not batched.
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def member_names(self) -> frozenset[str]:
        """The members this decoder reads; everything else is dropped before the shuffle buffer."""
        names = {"json"}
        if not self.caption_key.startswith("json:"):
            names.add(self.caption_key)
        if self.transform is not None:
            names.update(IMAGE_EXTENSIONS)
        names.update(f"{name}.npy" for name in self.precomputed)
        return frozenset(names)

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        meta = _read_json(raw)
        out = {"key": str(raw.get("__key__")), "caption": self._caption(raw, meta, rng), "meta": meta}
        for name in self.precomputed:
            out[name] = self._read_npy(raw, name)
        if self.transform is not None:
            out.update(self.transform(_image_bytes(raw), rng))
        return out

    def _caption(self, raw: dict, meta: dict, rng: random.Random) -> str:
        if self.caption_key == "cls":
            text = class_caption(_read_label(raw, len(self.class_names)), self.class_names, self.templates, rng)
        elif self.caption_key.startswith("json:"):
            text = _json_caption(meta, self.caption_key[5:], rng)
        else:
            if self.caption_key not in raw:
                raise SkipSample("missing_caption", f"no .{self.caption_key} member")
            text = _utf8(raw[self.caption_key])
        text = clean_caption(text, self.lowercase)
        if not text:
            raise SkipSample("empty_caption", "caption is empty after cleaning")
        return text

    def _read_npy(self, raw: dict, name: str) -> torch.Tensor:
        member = f"{name}.npy"
        if member not in raw:
            raise SkipSample(f"missing_{name}", f"no .{member} member")
        try:
            array = np.load(io.BytesIO(raw[member]), allow_pickle=False)
        except Exception as exn:
            raise SkipSample(f"bad_{name}", f"{type(exn).__name__}: {exn}") from None
        expected = self._shapes.setdefault(name, array.shape)
        if array.shape != expected:
            # Precompute with a fixed padding length; variable shapes cannot be stacked into a batch.
            raise SkipSample(f"bad_{name}", f"shape {array.shape} != {expected} (the first one seen)")
        return torch.from_numpy(array.astype(bool) if name == "text_mask" else array)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_caption", f"not utf-8: {exn}") from None


def _read_json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exn:
        raise SkipSample("bad_json", f"{type(exn).__name__}: {exn}") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f".json holds a {type(meta).__name__}, not an object")
    return meta


def _json_caption(meta: dict, field_name: str, rng: random.Random) -> str:
    """A caption from meta[field]; a list of captions (COCO style) gives one drawn with `rng`."""
    value = meta.get(field_name)
    if isinstance(value, list) and value:
        value = rng.choice(value)
    if not isinstance(value, str):
        raise SkipSample("missing_caption", f"json field {field_name!r} is {type(value).__name__}, not text")
    return value


def _read_label(raw: dict, num_classes: int) -> int:
    if "cls" not in raw:
        raise SkipSample("missing_caption", "no .cls member")
    try:
        label = int(_utf8(raw["cls"]).strip())
    except ValueError:
        raise SkipSample("bad_label", f"not an integer: {raw['cls'][:20]!r}") from None
    if not 0 <= label < num_classes:
        raise SkipSample("bad_label", f"label {label} outside [0, {num_classes})")
    return label


def _image_bytes(raw: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    members = sorted(k for k in raw if not k.startswith("__"))
    raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member (has {members})")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> contiguous float32 (B, 3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def collate(samples: list[dict], uint8_images: bool = False) -> dict:
    """Stack decoded samples into a batch.

    Images: uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]; with `uint8_images`, a uint8
    (B, 3, H, W) view instead (channels-last strides), for conversion after the host-to-device copy.
    """
    first = samples[0]
    batch: dict = {name: [s[name] for s in samples] for name in ("caption", "key", "meta")}
    for name in IMAGE_KEYS:
        if name in first:
            stacked = torch.from_numpy(np.stack([s[name] for s in samples]))  # (B, H, W, 3) uint8
            images = stacked.permute(0, 3, 1, 2)  # (B, 3, H, W), a view
            batch[name] = images if uint8_images else to_unit_range(images)
    for name in PRECOMPUTED_FIELDS:
        if name in first:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch
