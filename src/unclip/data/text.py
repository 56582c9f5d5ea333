"""Caption cleaning and class-label captions (standard library only)."""

from __future__ import annotations

import html
import random
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
