"""Caption cleaning and class-label captions (standard library only)."""

from __future__ import annotations

import html
import random
import re
import unicodedata
from collections.abc import Sequence

DEFAULT_TEMPLATE = "{}"


def clean_caption(text: str, lowercase: bool = False) -> str:
    """Unescape HTML entities, drop control/format characters, collapse whitespace, optionally lowercase.

    Returns "" when nothing printable is left; the caller treats that as a skipped sample.
    """
    if "&" in text:
        text = html.unescape(text)  # web captions often carry "&amp;", "&quot;"
    if not text.isprintable():
        # Tabs/newlines become spaces; other control (Cc), format (Cf, e.g. zero-width), surrogate and
        # unassigned characters (category C*) are removed.
        text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def resolve_class_names(class_names: Sequence[str] | str | None) -> list[str] | None:
    """A list of class names; the string "imagenet" means open_clip's 1000 ImageNet class names."""
    if class_names is None:
        return None
    if isinstance(class_names, str):
        if class_names != "imagenet":
            raise ValueError(f"class_names must be a list of names or the string 'imagenet', got {class_names!r}")
        from unclip.clip.encoder import imagenet_class_names  # imports open_clip: only when asked for

        return imagenet_class_names()
    return [str(name) for name in class_names]


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """Validate caption templates: each must contain exactly one "{}" for the class name."""
    templates = [str(t) for t in templates] if templates else [DEFAULT_TEMPLATE]
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"caption template {t!r} must contain exactly one '{{}}' for the class name")
    return templates


def class_caption(label: int, class_names: Sequence[str], templates: Sequence[str], rng: random.Random) -> str:
    """Caption for class `label`: a template drawn with the sample's `rng`, filled with the class name."""
    template = templates[0] if len(templates) == 1 else rng.choice(templates)
    return template.format(class_names[label])


# Spatial words and their opposites, by axis (hard negatives for contrastive training).
SPATIAL_OPPOSITES: dict[str, dict[str, str]] = {
    "vertical": {"top": "bottom", "bottom": "top", "upper": "lower", "lower": "upper", "above": "below",
                 "below": "above", "over": "under", "under": "over", "beneath": "above"},
    "horizontal": {"left": "right", "right": "left"},
}
_WORD = re.compile(r"[A-Za-z]+")
_SWAP_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")  # "medium-sized" is one word to swap


def spatial_axes(caption: str) -> list[str]:
    """The axes ("vertical", "horizontal") whose direction words the caption uses."""
    words = {m.group().lower() for m in _WORD.finditer(caption)}
    return [axis for axis, swaps in SPATIAL_OPPOSITES.items() if words & swaps.keys()]


def mirror_caption(caption: str, axes: Sequence[str]) -> str:
    """The caption with its direction words on `axes` swapped for their opposites ("top left" on
    ["vertical"] -> "bottom left"), keeping capitalisation: the caption of the image flipped on those axes."""
    swaps = {k: v for axis in axes for k, v in SPATIAL_OPPOSITES[axis].items()}

    def swap(match: re.Match) -> str:
        word = match.group()
        new = swaps.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(swap, caption)


def spatial_negative(caption: str, rng: random.Random) -> str | None:
    """The caption with its spatial words mirrored on one or both axes ("a red circle in the top left" ->
    "... bottom left", "... top right" or "... bottom right"), or None when it names no direction.

    A hard negative that differs from the caption only in where things are, in the spirit of NegCLIP
    (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"): in-batch
    negatives almost never differ from a positive by position alone, so contrastive training alone learns
    position last.
    """
    axes = spatial_axes(caption)
    if not axes:
        return None
    choices = [[a] for a in axes] + ([axes] if len(axes) > 1 else [])
    return mirror_caption(caption, choices[int(rng.random() * len(choices))])


def word_classes(group: Sequence[str]) -> dict[str, int]:
    """A swap group's words -> the index of their class. Each entry of `group` is one class, its synonyms
    joined by "|" ("circle|disk", "medium|medium-sized"): two words of one class are never swapped for each other."""
    classes: dict[str, int] = {}
    for index, entry in enumerate(group):
        for word in str(entry).lower().split("|"):
            if not word or not _SWAP_WORD.fullmatch(word):
                raise ValueError(f"swap group entry {entry!r}: expected words (letters, inner hyphens) joined by '|'")
            if classes.setdefault(word, index) != index:
                raise ValueError(f"swap group: {word!r} is in two classes")
    return classes


def swap_words(caption: str, classes: dict[str, int], rng: random.Random | None = None) -> str | None:
    """The caption with two of its words of different classes (`word_classes`) exchanged, keeping
    capitalisation, or None when it has no two such words. With more than two, `rng` picks the pair (the first
    two without it): "a blue triangle beneath a green cross" -> "a green triangle beneath a blue cross"."""
    found = [m for m in _SWAP_WORD.finditer(caption) if m.group().lower() in classes]
    pairs = [(a, b) for i, a in enumerate(found) for b in found[i + 1:]
             if classes[a.group().lower()] != classes[b.group().lower()]]
    if not pairs:
        return None
    a, b = pairs[int(rng.random() * len(pairs))] if rng is not None else pairs[0]

    def cased(word: str, like: str) -> str:
        return word.capitalize() if like[0].isupper() else word.lower()

    first, second = cased(b.group(), a.group()), cased(a.group(), b.group())
    return caption[: a.start()] + first + caption[a.end(): b.start()] + second + caption[b.end():]


def swap_negative(caption: str, groups: Sequence[dict[str, int]], rng: random.Random,
                  exclude: Sequence[str] = ()) -> str | None:
    """A hard negative that binds attributes to the wrong objects: two words of one group (`word_classes`,
    e.g. colours) exchanged, the group drawn among those the caption has two different words of; None when it
    has none. "a blue triangle beneath a green cross" -> "a green triangle beneath a blue cross" (colours) or
    "a blue cross beneath a green triangle" (shapes). A swap that would bring in a phrase of `exclude` (word
    sequences, e.g. held-out colour-shape pairs, which must stay unseen: met only as negatives, they would be
    learned as wrong) is not made.

    Contrastive batches almost never hold such a pair, so a CLIP trained on them alone encodes a caption as a
    bag of words (NegCLIP's swap negatives, Yuksekgonul et al. 2023, sec. 4) and its image embedding cannot
    say which object has which colour: the decoder conditioned on it cannot either.
    """
    options = [swapped for classes in groups if (swapped := swap_words(caption, classes, rng)) is not None]
    if exclude:
        before = _phrases_in(caption, exclude)
        options = [o for o in options if _phrases_in(o, exclude) <= before]
    return options[int(rng.random() * len(options))] if options else None


def replace_negative(caption: str, groups: Sequence[dict[str, int]], rng: random.Random,
                     exclude: Sequence[str] = ()) -> str | None:
    """A hard negative that names one attribute wrongly: one word of a group (`word_classes`, e.g. shapes)
    replaced by a word of another class of that group, both drawn by `rng`; None when the caption has no word
    of any group. "a small red star at the top" -> "a small red circle at the top" (shapes). A replacement that
    would bring in a phrase of `exclude` (e.g. a held-out colour-shape pair) is not made.

    NegCLIP's replace negatives (Yuksekgonul et al. 2023, sec. 4; SugarCrepe's REPLACE): contrastive batches
    rarely hold a caption that differs from the positive in one attribute alone, so an attribute that is hard
    to see (a shape a few pixels wide) is learned last; this term asks for it at every step.
    """
    found = [(m, classes) for classes in groups for m in _SWAP_WORD.finditer(caption) if m.group().lower() in classes]
    options = []
    for m, classes in found:
        own = classes[m.group().lower()]
        names = {c: w for w, c in reversed(list(classes.items()))}  # each class's first word
        for cls, word in sorted(names.items()):
            if cls == own:
                continue
            word = word.capitalize() if m.group()[0].isupper() else word
            options.append(caption[: m.start()] + word + caption[m.end():])
    if exclude:
        before = _phrases_in(caption, exclude)
        options = [o for o in options if _phrases_in(o, exclude) <= before]
    return options[int(rng.random() * len(options))] if options else None


def _phrases_in(caption: str, phrases: Sequence[str]) -> set[str]:
    """The phrases (word sequences, case-insensitive) that occur in the caption as whole words."""
    words = " " + " ".join(m.group().lower() for m in _WORD.finditer(caption)) + " "
    return {p for p in phrases if " " + " ".join(_WORD.findall(p.lower())) + " " in words}
