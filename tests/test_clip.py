"""The CLIP stage: the encoder wrapper, frozen use, contrastive training, checkpoints, offline behaviour."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from unclip.clip.encoder import ClipEncoder, PretrainedUnavailableError
from unclip.clip.system import ClipSystem
from unclip.data.shapes import make_sample

from .conftest import CONF


def tiny_cfg() -> dict:
    cfg = yaml.safe_load((CONF / "clip" / "tiny.yaml").read_text())
    cfg.pop("_target_")
    return cfg


def shapes_batch(n: int, split: str = "train", offset: int = 0, size: int = 32) -> dict:
    images, captions, metas = [], [], []
    for i in range(n):
        img, caption, attrs = make_sample(0, split, offset + i, image_size=size)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(caption)
        metas.append({"attributes": attrs})
    return {"image": torch.stack(images), "caption": captions, "meta": metas}


@pytest.fixture(scope="module")
def trained_clip() -> ClipEncoder:
    """A tiny CLIP trained for a few seconds on `shapes` pairs."""
    torch.manual_seed(0)
    encoder = ClipEncoder(**tiny_cfg(), trainable=True)
    system = ClipSystem(encoder)
    system.setup("fit")
    data = [shapes_batch(32, offset=32 * k) for k in range(8)]
    opt = torch.optim.AdamW(system.parameters(), lr=2e-3)
    losses = []
    for step in range(120):
        image_f, text_f, scale = system.features(data[step % 8])
        loss = system.loss_fn(image_f, text_f, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    encoder.losses = losses
    encoder.requires_grad_(False).eval()
    return encoder


def test_tiny_clip_from_yaml_outputs():
    enc = ClipEncoder(**tiny_cfg())
    captions = ["a red circle", "a small blue star in the upper left corner on a white background"]
    out = enc.encode_text(captions)
    tokens = enc.tokenize(captions)
    assert out["text_embed"].shape == (2, 32) and out["text_embed"].dtype == torch.float32
    assert out["text_tokens"].shape == (2, 32, 32) and out["text_tokens"].dtype == torch.float32
    assert out["text_mask"].dtype == torch.bool and torch.equal(out["text_mask"], tokens != 0)
    assert out["text_mask"].sum(1).tolist() == [len(enc.tokenizer.encode(c)) + 2 for c in captions]
    image = enc.encode_image(torch.rand(3, 3, 48, 40) * 2 - 1)  # any size: resized and cropped
    assert image.shape == (3, 32) and torch.isfinite(image).all()
    assert enc.identity["embed_dim"] == 32 and len(enc.identity["weights_sha256"]) == 64
    assert ClipEncoder(**tiny_cfg()).identity["weights_sha256"] == enc.identity["weights_sha256"]  # seeded init
    assert ClipEncoder(**{**tiny_cfg(), "init_seed": 1}).identity["weights_sha256"] != enc.identity["weights_sha256"]


def test_truncation_is_reported():
    enc = ClipEncoder(**tiny_cfg())
    assert enc.truncated(["a red circle", "a red circle " * 20]) == [False, True]


def test_frozen_encoder_has_no_grads_stays_in_eval_and_is_not_part_of_a_stage(tiny_checkpoints):
    from hydra.utils import instantiate

    enc = ClipEncoder(**tiny_cfg())
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    out = enc.encode_text(["a red circle"])
    assert not out["text_embed"].requires_grad

    net = instantiate(yaml.safe_load((CONF / "model" / "net" / "prior_tiny.yaml").read_text()))
    from unclip.diffusion.gaussian import GaussianDiffusion
    from unclip.systems.prior import PriorSystem

    system = PriorSystem(net, GaussianDiffusion(prediction_type="sample"), clip=enc)
    assert not any(k.startswith(("clip", "_clip", "encoder")) for k in system.state_dict())
    clip_params = {id(p) for p in enc.parameters()}
    assert not clip_params & {id(p) for p in system.parameters()}
    groups = system.parameter_groups(0.01)
    assert not clip_params & {id(p) for g in groups for p in g["params"]}
    system.to(torch.float64)  # the frozen CLIP moves with its stage
    assert next(enc.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="frozen"):
        PriorSystem(net, GaussianDiffusion(), clip=ClipEncoder(**tiny_cfg(), trainable=True))


def test_a_few_training_steps_lower_the_contrastive_loss(trained_clip):
    losses = trained_clip.losses
    assert np.mean(losses[-16:]) < np.mean(losses[:8]) - 0.3


def test_clip_score_ranks_the_matching_caption_higher(trained_clip):
    from unclip.eval.metrics import ImageMetrics

    batch = shapes_batch(48, split="val")
    scores = {}
    for name, captions in {"match": batch["caption"], "mismatch": batch["caption"][1:] + batch["caption"][:1]}.items():
        m = ImageMetrics(["clip_score"], encoder=trained_clip)
        m.update_fake(batch["image"], captions=captions)
        scores[name] = m.compute()["clip_score"]
    assert scores["match"] > scores["mismatch"] + 2.0


def test_zero_shot_attributes_beat_chance(trained_clip):
    from unclip.eval.zero_shot import shapes_zero_shot

    batch = shapes_batch(96, split="val")
    with torch.no_grad():
        image_embed = trained_clip.encode_image(batch["image"])
    out = shapes_zero_shot(trained_clip, image_embed, batch["meta"])
    assert out["zeroshot_n"] > 10
    assert set(out) == {"zeroshot_n", "zeroshot_colour", "zeroshot_shape", "zeroshot_size", "zeroshot_position",
                        "zeroshot_all"}
    assert all(0.0 <= out[k] <= 1.0 for k in out if k != "zeroshot_n")
    assert out["zeroshot_colour"] > 1 / 8 + 0.1  # the colour is what a few CPU steps learn first


class _AttributeEncoder:
    """A stand-in CLIP whose text embedding is the one-hot code of the caption's attributes."""

    def __init__(self):
        from unclip.eval.zero_shot import ATTRIBUTE_VALUES

        self.values = ATTRIBUTE_VALUES

    def code(self, attributes: dict) -> torch.Tensor:
        return torch.cat([F.one_hot(torch.tensor(vs.index(attributes[a])), len(vs)).float()
                          for a, vs in self.values.items()])

    def encode_text(self, captions):
        from unclip.data.shapes import parse_caption

        return {"text_embed": torch.stack([self.code(parse_caption(c)["objects"][0]) for c in captions])}


def test_zero_shot_marginals_read_every_attribute():
    """An image embedding that encodes its attributes is classified right; one from another image is not."""
    from unclip.eval.zero_shot import PROMPTS, shapes_zero_shot

    assert len(set(PROMPTS)) == 3 * 8 * 6 * 9
    enc = _AttributeEncoder()
    metas = [make_sample(0, "val", i, image_size=16)[2] for i in range(40)]
    single = [m for m in metas if len(m["objects"]) == 1]
    image_embed = torch.stack([enc.code(m["objects"][0]) if m in single else torch.zeros(26)
                               for m in metas])
    out = shapes_zero_shot(enc, image_embed, metas, logit_scale=10.0)
    assert out["zeroshot_n"] == len(single) > 5
    assert all(out[f"zeroshot_{a}"] == 1.0 for a in ("size", "colour", "shape", "position", "all"))
    wrong = shapes_zero_shot(enc, image_embed.roll(1, dims=0), metas, logit_scale=10.0)
    assert wrong["zeroshot_all"] < 0.2


def test_clip_checkpoint_reloads_to_identical_embeddings(tiny_checkpoints):
    path = tiny_checkpoints["clip"]
    a, b = ClipEncoder(checkpoint=str(path)), ClipEncoder(checkpoint=str(path))
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"]
    assert a.identity["weights_sha256"] != ClipEncoder(**tiny_cfg()).identity["weights_sha256"]  # trained
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a.encode_image(images), b.encode_image(images))
    # clip.checkpoint=PATH on top of a preset: the checkpoint wins
    c = ClipEncoder(**{**tiny_cfg(), "checkpoint": str(path)})
    assert c.identity["weights_sha256"] == a.identity["weights_sha256"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    from unclip.clip.encoder import state_dict_sha256

    prefix = "encoder.model."
    system_weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    reference = ClipEncoder(**tiny_cfg())
    reference.model.load_state_dict(system_weights)
    assert state_dict_sha256(reference.model) == a.identity["weights_sha256"]


def test_a_non_clip_checkpoint_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="'prior' checkpoint, but a 'clip' checkpoint"):
        ClipEncoder(checkpoint=str(tiny_checkpoints["prior"]))


def test_offline_pretrained_tag_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PretrainedUnavailableError) as err:
        ClipEncoder(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir="/nonexistent-cache")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg and "huggingface.co" in msg
    assert "clip.pretrained=/path/to" in msg
    with pytest.raises(ValueError, match="Known tags"):
        ClipEncoder(model_name="ViT-B-32", pretrained="no-such-tag")


def test_source_validation():
    with pytest.raises(ValueError, match="exactly one CLIP source"):
        ClipEncoder()
    with pytest.raises(ValueError, match="needs clip.model_name"):
        ClipEncoder(architecture=tiny_cfg()["architecture"], pretrained="x")


def test_precomputed_fields_skip_clip(tiny_checkpoints):
    """A stage given precomputed fields in the batch takes them as they are and never runs CLIP."""
    from hydra.utils import instantiate

    from unclip.diffusion.gaussian import GaussianDiffusion
    from unclip.systems.prior import PriorSystem

    net = instantiate(yaml.safe_load((CONF / "model" / "net" / "prior_tiny.yaml").read_text()))
    enc = ClipEncoder(**tiny_cfg())
    calls = []
    enc.encode_text = lambda *a, **k: calls.append("text")  # would break if called
    enc.encode_image = lambda *a, **k: calls.append("image")
    system = PriorSystem(net, GaussianDiffusion(prediction_type="sample"), clip=enc)
    batch = {"caption": ["x"] * 2, "image_embed": torch.randn(2, 32).half(), "text_embed": torch.randn(2, 32).half(),
             "text_tokens": torch.randn(2, 32, 32).half(), "text_mask": torch.ones(2, 32, dtype=torch.bool)}
    feats = system.clip_features(batch, ("text_embed", "text_tokens", "text_mask", "image_embed"))
    assert not calls and feats["text_tokens"].dtype == torch.float32 and feats["text_mask"].dtype == torch.bool
    assert torch.allclose(F.normalize(feats["image_embed"], dim=-1), F.normalize(batch["image_embed"].float(), dim=-1))


def test_spatial_negatives_mirror_positions_and_keep_everything_else():
    import random

    from unclip.data.shapes import parse_caption
    from unclip.data.text import spatial_negative

    rng = random.Random(0)
    assert spatial_negative("a red circle in the center", rng) is None
    assert spatial_negative("Above, a cat", rng) == "Below, a cat"
    assert {spatial_negative("a star in the top left", rng) for _ in range(50)} == {
        "a star in the bottom left", "a star in the top right", "a star in the bottom right"}
    changed = 0
    for i in range(200):
        _, caption, meta = make_sample(0, "train", i, image_size=16)
        negative = spatial_negative(caption, rng)
        if negative is None:
            continue
        a, b = parse_caption(caption), parse_caption(negative)
        assert [(o["shape"], o["colour"], o.get("size")) for o in a["objects"]] == \
               [(o["shape"], o["colour"], o.get("size")) for o in b["objects"]]
        assert (a["relation"], a["objects"][0].get("position")) != (b["relation"], b["objects"][0].get("position"))
        changed += 1
    assert changed > 120  # every caption but the centred single objects


SWAP_GROUPS = {"colour": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
               "shape": ["circle|disk", "square", "triangle", "star", "cross", "diamond|rhombus"]}


def test_swap_negatives_exchange_attributes_between_objects():
    import random

    from unclip.data.shapes import parse_caption
    from unclip.data.text import swap_negative, swap_words, word_classes

    colours, shapes = (word_classes(g) for g in SWAP_GROUPS.values())
    assert swap_words("There is a blue triangle beneath a green cross", colours) == \
        "There is a green triangle beneath a blue cross"
    assert swap_words("Blue square above a red star", colours) == "Red square above a blue star"  # case kept
    assert swap_words("a purple disk right of a purple circle", colours) is None  # one colour: nothing to bind
    assert swap_words("a purple disk right of a purple circle", shapes) is None  # synonyms are one class
    assert swap_words("a red circle in the center", colours) is None
    with pytest.raises(ValueError, match="two classes"):
        word_classes(["red|blue", "blue"])
    with pytest.raises(ValueError, match="inner hyphens"):
        word_classes(["mid sized"])
    assert swap_words("A medium-sized red star over a big cyan disk", word_classes(["small", "medium-sized", "big"])) \
        == "A big red star over a medium-sized cyan disk"
    rng, kinds = random.Random(0), {"colour": 0, "shape": 0}
    for i in range(300):
        _, caption, _ = make_sample(0, "train", i, image_size=16)
        negative = swap_negative(caption, [colours, shapes], rng)
        a = parse_caption(caption)
        if len(a["objects"]) < 2 or all(a["objects"][0][k] == a["objects"][1][k] for k in ("colour", "shape")):
            assert negative is None, caption
            continue
        b = parse_caption(negative)
        assert b["relation"] == a["relation"] and b.get("background") == a.get("background")
        (c0, s0), (c1, s1) = [(o["colour"], o["shape"]) for o in a["objects"]]
        got = [(o["colour"], o["shape"]) for o in b["objects"]]
        kind = {((c1, s0), (c0, s1)): "colour", ((c0, s1), (c1, s0)): "shape"}[tuple(got)]
        kinds[kind] += 1
    assert kinds["colour"] > 30 and kinds["shape"] > 30  # both groups are drawn


def test_swap_negatives_never_bring_in_an_excluded_phrase():
    import random

    from unclip.data.shapes import HELDOUT_PHRASES
    from unclip.data.text import swap_negative, word_classes

    groups = [word_classes(g) for g in SWAP_GROUPS.values()]
    assert swap_negative("a red circle above a blue square", groups[:1], random.Random(0)) == \
        "a blue circle above a red square"
    assert swap_negative("a red circle above a blue square", groups[:1], random.Random(0), HELDOUT_PHRASES) is None
    # a held-out caption may lose its pair: "a blue cross left of a red star" -> "a red cross left of a blue star"
    kept = swap_negative("a blue cross left of a red star", groups[:1], random.Random(0), HELDOUT_PHRASES)
    assert kept == "a red cross left of a blue star"
    rng, made = random.Random(1), 0
    for i in range(400):
        caption = make_sample(0, "train", i, image_size=16)[1]
        negative = swap_negative(caption, groups, rng, HELDOUT_PHRASES)
        if negative is not None:
            made += 1
            assert not any(p in negative.lower() for p in HELDOUT_PHRASES), negative
    assert made > 100


def test_replace_negatives_name_one_attribute_wrongly_and_keep_everything_else():
    import random

    from unclip.data.shapes import HELDOUT_PHRASES, parse_caption
    from unclip.data.shapes import SWAP_GROUPS as GROUPS
    from unclip.data.text import replace_negative, word_classes

    shapes, sizes = word_classes(GROUPS["shape"]), word_classes(GROUPS["size"])
    rng = random.Random(0)
    assert replace_negative("a red circle in the center", [sizes], rng) is None  # no size word: nothing to replace
    seen = {replace_negative("A disk at the top", [shapes], rng) for _ in range(200)}
    assert seen == {"A square at the top", "A triangle at the top", "A star at the top", "A diamond at the top",
                    "A cross at the top"}  # every other class, case kept; never the synonym "circle"
    # "a red star" -> "a red square" would bring in a held-out pair
    assert all("red square" not in replace_negative("a red star", [shapes], rng, HELDOUT_PHRASES) for _ in range(100))
    changed = {"shape": 0, "size": 0}
    for i in range(300):
        caption = make_sample(0, "train", i, image_size=16)[1]
        negative = replace_negative(caption, [shapes, sizes], rng, HELDOUT_PHRASES)
        assert negative is not None and not any(p in negative.lower() for p in set(HELDOUT_PHRASES) - set(
            p for p in HELDOUT_PHRASES if p in caption.lower())), (caption, negative)
        a, b = parse_caption(caption), parse_caption(negative)
        diffs = [(k, x[k], y[k]) for x, y in zip(a["objects"], b["objects"], strict=True) for k in x if x[k] != y[k]]
        assert len(diffs) == 1 and diffs[0][0] in changed, (caption, negative)  # exactly one attribute, renamed
        assert b.get("relation") == a.get("relation") and b.get("background") == a.get("background")
        changed[diffs[0][0]] += 1
    assert changed["shape"] > 100 and changed["size"] > 10  # both groups are drawn


@pytest.mark.parametrize("override", ["model.spatial_negatives=true",
                                      "model.swap_negatives={colour:[red,green,blue,yellow,purple,cyan,orange,pink]}",
                                      'model.replace_negatives={shape:["circle|disk",square,triangle,star,diamond,cross]}'])
def test_hard_negative_term_is_logged_and_trains(tmp_path, data_dir, override):
    from tests.conftest import train_stage

    train_stage("tiny_clip", tmp_path / "run", data_dir, [
        "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1",
        override, "callbacks.model_checkpoint.every_n_train_steps=6"])
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [float(r.split(",")[header.index("train/negative_loss")]) for r in rows[1:]
              if r.split(",")[header.index("train/negative_loss")]]
    assert len(values) >= 5 and all(0.0 < v < 5.0 for v in values)  # ~log 2 while the CLIP cannot tell them apart
    swap = [float(r.split(",")[header.index("val/swap_colour")]) for r in rows[1:]
            if "val/swap_colour" in header and r.split(",")[header.index("val/swap_colour")]]
    assert (len(swap) == 1 and 0.0 <= swap[0] <= 1.0) if "swap" in override else not swap


def test_binding_test_scores_a_bag_of_words_clip_zero_and_an_order_aware_one_one():
    """shapes_binding: with a text encoder that sums word vectors, a caption and its swap embed identically
    (0: ties are failures); with one that sees word order and images at their caption's embedding, 1."""
    import re

    from unclip.eval.zero_shot import shapes_binding

    words: dict[str, torch.Tensor] = {}

    def word(w: str) -> torch.Tensor:
        return words.setdefault(w, torch.randn(16, generator=torch.Generator().manual_seed(len(words))))

    def bag(captions):
        return {"text_embed": torch.stack([sum(word(w) for w in sorted(re.findall("[a-z]+", c.lower())))
                                           for c in captions])}

    def ordered(captions):
        return {"text_embed": torch.stack([sum((i + 1) * word(w) for i, w in enumerate(re.findall("[a-z]+", c.lower())))
                                           for c in captions])}

    captions = [make_sample(0, "val", i, image_size=16)[1] for i in range(60)]
    for encoder, expected in ((bag, 0.0), (ordered, 1.0)):
        out = shapes_binding(type("E", (), {"encode_text": staticmethod(encoder)}), ordered(captions)["text_embed"],
                             captions)
        assert out["swap_colour"] == expected and out["swap_shape"] == expected and out["swap_colour_n"] >= 10, out
    assert out["swap_relation"] == 1.0 and out["swap_relation_n"] >= 10  # "left of" -> "right of" is told apart

    def blind(captions):  # knows every word but the directions: a caption and its reversed relation tie
        directions = {"left", "right", "above", "below", "over", "under", "beneath", "top", "bottom"}
        return ordered([" ".join(w for w in re.findall("[a-z]+", c.lower()) if w not in directions) for c in captions])

    out = shapes_binding(type("E", (), {"encode_text": staticmethod(blind)}), blind(captions)["text_embed"], captions)
    assert out["swap_relation"] == 0.0 and out["swap_colour"] == 1.0


def test_shapes_swap_groups_cover_the_caption_vocabulary():
    """Every colour, shape and size word the generator writes is in its SWAP_GROUPS class, synonyms together."""
    from unclip.data.shapes import HELDOUT_PHRASES, SIZE_WORDS, SWAP_GROUPS, parse_caption
    from unclip.data.text import swap_words, word_classes

    classes = {name: word_classes(group) for name, group in SWAP_GROUPS.items()}
    assert classes["size"]["tiny"] == classes["size"]["small"] != classes["size"]["big"]
    assert classes["shape"]["disk"] == classes["shape"]["circle"] and len(SIZE_WORDS) == 3
    assert len(HELDOUT_PHRASES) == 8 and "blue cross" in HELDOUT_PHRASES
    swapped = {"size": 0}
    for i in range(300):
        caption = make_sample(2, "train", i, image_size=16)[1]
        objects = parse_caption(caption)["objects"]
        if len(objects) == 2 and "size" in objects[0] and objects[0]["size"] != objects[1]["size"]:
            negative = parse_caption(swap_words(caption, classes["size"]))["objects"]
            assert [o["size"] for o in negative] == [objects[1]["size"], objects[0]["size"]], caption
            swapped["size"] += 1
    assert swapped["size"] > 10


def test_mirror_twins_are_flipped_images_with_the_captions_that_describe_them():
    """Every twin must be what the generator would caption its way: ShapesEval reads the flipped image and
    the mirrored caption agrees on every stated attribute; rows without a flippable direction are kept."""
    import random

    from unclip.eval.shapes_eval import read_scene, score_scene

    samples = [make_sample(3, "train", i, image_size=64) for i in range(64)]
    images = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
                          for im, _, _ in samples])
    captions = [c for _, c, _ in samples]
    system = ClipSystem.__new__(ClipSystem)  # the twin maker needs only its settings
    system.mirror_twins, system.mirror_axes = 0.5, ("horizontal", "vertical")
    system.no_vertical_words = {"star", "triangle"}
    random.seed(0)
    out = ClipSystem.with_mirror_twins(system, {"image": images, "caption": captions})
    assert torch.equal(out["image"][:32], images[:32]) and out["caption"][:32] == captions[:32]
    twins = [j for j in range(32, 64) if out["caption"][j] != captions[j]]
    assert len(twins) > 20
    flips = {"h": 0, "v": 0}
    for j in range(32, 64):
        assert score_scene(read_scene(out["image"][j]), out["caption"][j])["all"], out["caption"][j]
        if j in twins:
            source = images[j - 32]
            flips["h" if torch.equal(out["image"][j], source.flip(-1)) else "v"] += 1
            if torch.equal(out["image"][j], source.flip(-2)):
                assert not {"star", "triangle"} & set(out["caption"][j].lower().replace(",", " ").split())
        else:
            assert torch.equal(out["image"][j], images[j])
    assert flips["h"] > 0 and flips["v"] > 0
    with pytest.raises(ValueError, match="mirror_twins"):
        ClipSystem(ClipEncoder(**tiny_cfg(), trainable=True), mirror_twins=0.7)
    # one axis given as a word (a Hydra override `model.mirror_axes=vertical`) is that axis, not its letters
    one = ClipSystem(ClipEncoder(**tiny_cfg(), trainable=True), mirror_twins=0.25, mirror_axes="vertical",
                     no_vertical_words="star")
    assert one.mirror_axes == ("vertical",) and one.no_vertical_words == {"star"}
    with pytest.raises(ValueError, match=r"got \['sideways'\]"):
        ClipSystem(ClipEncoder(**tiny_cfg(), trainable=True), mirror_axes="sideways")
