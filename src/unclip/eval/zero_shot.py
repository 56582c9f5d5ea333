"""Zero-shot attribute classification of `shapes` images with a CLIP (the CLIP stage's quality bar).

The prompts are every plain single-object caption, "a {size} {colour} {shape} {position phrase}"
(3 x 8 x 6 x 9 = 1296), so each prompt reads like the captions the CLIP was trained on. Each attribute is
classified by its marginal under the CLIP's caption distribution: with s_k = logit_scale * cos(image, prompt k),

    p(value | image) ∝ sum over prompts k stating that value of exp(s_k)

(a prompt ensemble in the sense of CLIP, Radford et al. 2021, section 3.1.4, summed in probability rather than
averaged in embedding space, so the other attributes are marginalised out rather than blurred together).
`zeroshot_all` counts images whose four attributes are all right. Two-object scenes are left out (a colour
would be ambiguous there); `shapes_binding` tests them instead: does the image prefer its caption over the same
caption with the two objects' colours (shapes, sizes) exchanged, or with their relation reversed? A bag-of-words
CLIP scores 0.5 there (Yuksekgonul et al. 2023, the attribution and relation tests of their ARO benchmark).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unclip.data.shapes import POSITIONS, SIZES, SWAP_GROUPS, canonical_caption
from unclip.data.shapes_render import COLOURS, SHAPES

__all__ = ["ATTRIBUTE_VALUES", "PROMPT_ATTRIBUTES", "PROMPTS", "shapes_binding", "shapes_zero_shot", "swap_binding"]

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES), "colour": tuple(COLOURS), "shape": tuple(SHAPES), "position": tuple(POSITIONS),
}
PROMPT_ATTRIBUTES: list[dict[str, str]] = [
    dict(zip(ATTRIBUTE_VALUES, values)) for values in itertools.product(*ATTRIBUTE_VALUES.values())
]
PROMPTS: list[str] = [canonical_caption(**a) for a in PROMPT_ATTRIBUTES]


@torch.no_grad()
def _prompt_embeddings(encoder: Any, batch_size: int) -> torch.Tensor:
    """(K, D) unit text embeddings of PROMPTS."""
    chunks = [encoder.encode_text(PROMPTS[i : i + batch_size])["text_embed"].float()
              for i in range(0, len(PROMPTS), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def shapes_zero_shot(encoder: Any, image_embed: torch.Tensor, metas: Sequence[dict],
                     logit_scale: float | None = None, batch_size: int = 256) -> dict[str, float]:
    """Accuracy per attribute (`zeroshot_<attribute>`), all four at once (`zeroshot_all`) and the image count
    (`zeroshot_n`) over the single-object images among `metas`.

    encoder: has encode_text(list[str]) -> {"text_embed": (K, D)}, and an open_clip `model.logit_scale`
    unless `logit_scale` is given; image_embed: (N, D) for the N metas (each the sample's json, with its
    generator `attributes`).
    """
    attrs = [m.get("attributes", m) for m in metas]
    keep = [i for i, a in enumerate(attrs) if len(a.get("objects", [])) == 1]
    if not keep:
        return {}
    if logit_scale is None:
        logit_scale = float(encoder.model.logit_scale.exp())
    images = F.normalize(image_embed[keep].float(), dim=-1)
    text = _prompt_embeddings(encoder, batch_size).to(images.device)
    logits = logit_scale * images @ text.T  # (N, K)
    out: dict[str, float] = {"zeroshot_n": float(len(keep))}
    all_right = torch.ones(len(keep), dtype=torch.bool)
    for attribute, values in ATTRIBUTE_VALUES.items():
        value_of_prompt = torch.tensor([values.index(a[attribute]) for a in PROMPT_ATTRIBUTES], device=logits.device)
        marginal = torch.stack([logits[:, value_of_prompt == v].logsumexp(dim=1) for v in range(len(values))], 1)
        truth = torch.tensor([values.index(attrs[i]["objects"][0][attribute]) for i in keep])
        right = marginal.argmax(dim=1).cpu() == truth
        out[f"zeroshot_{attribute}"] = right.float().mean().item()
        all_right &= right
    out["zeroshot_all"] = all_right.float().mean().item()
    return out


@torch.no_grad()
def swap_binding(encoder: Any, image_embed: torch.Tensor, captions: Sequence[str],
                 groups: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per group (name -> `word_classes`): `swap_<group>`, the fraction of images (N, D) preferring their caption
    over it with its first two words of different classes of that group exchanged (`swap_words`), over the
    captions that have two; `swap_<group>_n` counts them. encoder: has encode_text(list[str]) ->
    {"text_embed": (K, D)}."""
    from unclip.data.text import swap_words

    out: dict[str, float] = {}
    for name, classes in groups.items():
        pairs = [(i, n) for i, c in enumerate(captions) if (n := swap_words(c, classes)) is not None]
        out.update(_prefers_own(encoder, image_embed, captions, pairs, f"swap_{name}"))
    return out


def _prefers_own(encoder: Any, image_embed: torch.Tensor, captions: Sequence[str], pairs: list[tuple[int, str]],
                 key: str) -> dict[str, float]:
    """{key: fraction of (image i, negative caption) pairs where image i (a row of image_embed (N, D)) is closer
    to captions[i] than to the negative, key_n: their number}; {} without pairs."""
    if not pairs:
        return {}
    images = F.normalize(image_embed.float(), dim=-1)
    rows = torch.tensor([i for i, _ in pairs], device=images.device)
    own = F.normalize(encoder.encode_text([captions[i] for i, _ in pairs])["text_embed"].float(), dim=-1)
    negative = F.normalize(encoder.encode_text([n for _, n in pairs])["text_embed"].float(), dim=-1)
    picked = images.index_select(0, rows)
    prefers = (picked * own.to(picked.device)).sum(-1) > (picked * negative.to(picked.device)).sum(-1)
    return {key: prefers.float().mean().item(), f"{key}_n": float(len(pairs))}


def shapes_binding(encoder: Any, image_embed: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """`swap_binding` over the `shapes` vocabulary (`SWAP_GROUPS`): swap_colour, swap_shape, swap_size; and
    swap_relation: two-object captions against their relation reversed ("a red star left of a blue circle" ->
    "... right of ..."), which a CLIP that knows the two objects but not where each is scores 0.5 on."""
    from unclip.data.shapes import parse_caption
    from unclip.data.text import mirror_caption, spatial_axes, word_classes

    out = swap_binding(encoder, image_embed, captions, {k: word_classes(g) for k, g in SWAP_GROUPS.items()})
    pairs = [(i, mirror_caption(c, spatial_axes(c))) for i, c in enumerate(captions)
             if spatial_axes(c) and len(parse_caption(c)["objects"]) == 2]
    return out | _prefers_own(encoder, image_embed, captions, pairs, "swap_relation")
