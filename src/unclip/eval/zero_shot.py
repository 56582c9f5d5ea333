"""Zero-shot attribute classification of `shapes` images with a CLIP (the CLIP stage's quality bar).

For every single-object image and each attribute, the prediction is the attribute value whose prompt's text
embedding is closest to the image embedding:
    colour    "a {colour} shape"          shape     "a {shape}"
    size      "a {size} shape"            position  "a shape in the {position}"
Two-object scenes are left out (a colour prompt would be ambiguous there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unclip.data.shapes import POSITIONS, SIZES
from unclip.data.shapes_render import COLOURS, SHAPES

__all__ = ["ATTRIBUTE_PROMPTS", "shapes_zero_shot"]

ATTRIBUTE_PROMPTS: dict[str, dict[str, str]] = {
    "colour": {c: f"a {c} shape" for c in COLOURS},
    "shape": {s: f"a {s}" for s in SHAPES},
    "size": {s: f"a {s} shape" for s in SIZES},
    "position": {p: f"a shape in the {p}" for p in POSITIONS},
}


@torch.no_grad()
def shapes_zero_shot(encoder: Any, image_embed: torch.Tensor, metas: Sequence[dict]) -> dict[str, float]:
    """Accuracy per attribute (keys `zeroshot_<attribute>`, plus `zeroshot_n`) over single-object images.

    encoder: has encode_text(list[str]) -> {"text_embed": (K, D)}; image_embed: (N, D) for the N metas.
    """
    attrs = [m.get("attributes", m) for m in metas]
    keep = [i for i, a in enumerate(attrs) if len(a.get("objects", [])) == 1]
    if not keep:
        return {}
    images = F.normalize(image_embed[keep].float(), dim=-1)
    out: dict[str, float] = {"zeroshot_n": float(len(keep))}
    for attribute, prompts in ATTRIBUTE_PROMPTS.items():
        values = list(prompts)
        text = F.normalize(encoder.encode_text([prompts[v] for v in values])["text_embed"].float(), dim=-1)
        pred = (images @ text.to(images.device).T).argmax(dim=1).tolist()
        truth = [attrs[i]["objects"][0][attribute] for i in keep]
        out[f"zeroshot_{attribute}"] = sum(values[p] == t for p, t in zip(pred, truth)) / len(keep)
    return out
