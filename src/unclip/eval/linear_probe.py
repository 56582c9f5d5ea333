"""Linear probes: how much of each `shapes` attribute a CLIP embedding carries, read by a linear classifier.

    python -m unclip.eval.linear_probe --train '<embed out_dir>/train/*.tar' --test '<embed out_dir>/val/*.tar'

Reads shards written by `python -m unclip.data.embed` on `shapes` data (their `image_embed.npy`,
`text_embed.npy` and the generator's `json` attributes), fits one multinomial logistic regression per
(embedding, attribute) on the training shards (features standardised with the training mean and std, a small
L2 penalty, L-BFGS) and prints its accuracy on the test shards beside chance (the most frequent test class).
The attributes are probed on one-object scenes, where each names one class. `--two-objects` adds the colour and
shape of the left (top) object of each two-object scene related left / right (above / below), beside "bag": the
accuracy of knowing which two values the scene holds but not where. An embedding that is a bag of words reads at
the bag figure; one that binds each attribute to its object's place reads above it. `--within size` adds one
probe per size class, fitted and tested on that class's samples alone: an embedding can hold shape for each
size in its own directions, which one probe over all sizes misses (docs/RESULTS.md).

The decoder can draw only what its conditioning holds: a low image-embedding figure for an attribute caps the
decoder's ShapesEval for it whatever the decoder learns (docs/RESULTS.md uses this to choose the demo CLIP).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unclip.data.shapes import HORIZONTAL_RELATIONS
from unclip.data.shards import read_tar_samples

PROBED: tuple[str, ...] = ("shape", "colour", "position", "size", "background")
PAIR_PROBED: tuple[str, ...] = ("colour@left", "colour@top", "shape@left", "shape@top")
EMBEDDINGS: tuple[str, ...] = ("image_embed", "text_embed")


def _embedded_scenes(pattern: str) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
    """(embeddings {name: (D,)}, generator attributes) of every embedded `shapes` sample in the shards matching
    `pattern` (sorted). Raises FileNotFoundError when nothing matches."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    for path in paths:
        samples = read_tar_samples(path)
        for key in sorted(samples):
            sample = samples[key]
            if "json" not in sample or any(f"{name}.npy" not in sample for name in EMBEDDINGS):
                continue
            attributes = json.loads(sample["json"]).get("attributes") or {}
            if attributes.get("objects"):
                yield ({name: np.load(io.BytesIO(sample[f"{name}.npy"])).astype(np.float32) for name in EMBEDDINGS},
                       attributes)


def read_embedded_shapes(pattern: str, objects: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Embeddings {name: (N, D) float32} and labels {attribute: N names} of the samples with `objects` objects
    in the shards matching `pattern`. One object: the attributes of ``PROBED``. Two objects: ``PAIR_PROBED``,
    the colour and shape of the object farther left in scenes related left / right (``colour@left``), of the
    upper one in scenes related above / below (``colour@top``; None in the other scenes), with
    ``<label>/pair``: both objects' values, for the bag ceiling. Raises FileNotFoundError when nothing matches
    or no sample qualifies."""
    embeds: dict[str, list[np.ndarray]] = {name: [] for name in EMBEDDINGS}
    labels: dict[str, list] = {}
    for embed, attributes in _embedded_scenes(pattern):
        scene = attributes["objects"]
        if len(scene) != objects:
            continue
        for name in EMBEDDINGS:
            embeds[name].append(embed[name])
        if objects == 1:
            row = {"background": attributes["background"], **{a: scene[0][a] for a in PROBED[:-1]}}
        else:
            # the left object where the relation is horizontal, the upper one where it is vertical: the order
            # the caption states (on the other axis the two objects' order is free, and no caption says it)
            horizontal = attributes.get("relation") in HORIZONTAL_RELATIONS
            first = min(scene, key=lambda o: o["center"][0 if horizontal else 1])
            row = {}
            for attribute in ("colour", "shape"):
                for side, applies in (("left", horizontal), ("top", not horizontal)):
                    row[f"{attribute}@{side}"] = first[attribute] if applies else None
                pair = tuple(sorted(o[attribute] for o in scene))
                row[f"{attribute}@left/pair"] = row[f"{attribute}@top/pair"] = pair
        for k, v in row.items():
            labels.setdefault(k, []).append(v)
    if not labels:
        raise FileNotFoundError(f"no {objects}-object `shapes` samples with {EMBEDDINGS} in {pattern!r} (is it the "
                                "output of `python -m unclip.data.embed` on `shapes` shards?)")
    return {name: torch.from_numpy(np.stack(rows)) for name, rows in embeds.items()}, labels


def linear_probe(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor, test_y: Sequence[str],
                 weight_decay: float = 1e-4, max_iter: int = 500) -> float:
    """Test accuracy of a logistic regression fitted on (train_x (N, D), train_y); a test label never seen in
    training counts as wrong."""
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_y])
    y_test = torch.tensor([index.get(c, -1) for c in test_y])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, x_test = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(1) == y_test).float().mean().item()


def _probe_rows(train_x: dict[str, torch.Tensor], train_y: dict[str, list], test_x: dict[str, torch.Tensor],
                test_y: dict[str, list], suffix: str = "",
                attributes: Sequence[str] = PROBED) -> dict[str, dict[str, float]]:
    report = {}
    for attribute in attributes:  # a label of None: the sample has no such attribute (left out of its probe)
        train = [i for i, v in enumerate(train_y[attribute]) if v is not None]
        test = [i for i, v in enumerate(test_y[attribute]) if v is not None]
        y, y_test = [train_y[attribute][i] for i in train], [test_y[attribute][i] for i in test]
        if len(set(y)) < 2 or not y_test:
            continue  # a grammar that fixes the attribute (the demo's one size) has nothing to probe
        row: dict[str, float] = {name: linear_probe(train_x[name][train], y, test_x[name][test], y_test)
                                 for name in EMBEDDINGS}
        counts = np.unique(y_test, return_counts=True)[1]
        row["chance"] = float(counts.max() / counts.sum())
        row["classes"] = len(set(y))
        row["test"] = len(y_test)
        if f"{attribute}/pair" in test_y:  # knowing both values but not which object has which: 1 / distinct
            row["bag"] = float(np.mean([1.0 / len(set(test_y[f"{attribute}/pair"][i])) for i in test]))
        report[attribute + suffix] = row
    return report


def _subset(x: dict[str, torch.Tensor], y: dict[str, list[str]], keep: list[int]):
    index = torch.tensor(keep, dtype=torch.long)
    return {k: v[index] for k, v in x.items()}, {k: [v[i] for i in keep] for k, v in y.items()}


def probe_report(train_pattern: str, test_pattern: str, within: str | None = None,
                 two_objects: bool = False) -> dict[str, dict[str, float]]:
    """{attribute: {"image_embed": acc, "text_embed": acc, "chance": majority-class rate, "classes": n, "test": n}};
    with `within` (an attribute, e.g. "size") also {"<attribute>@<within>=<value>": row} for every other attribute,
    each probe fitted and tested on the samples whose `within` is that value. `two_objects`: also the rows of
    ``PAIR_PROBED`` on two-object scenes, each with "bag": the accuracy of knowing which two values the scene
    holds but not where (an embedding that binds attributes to places reads above it)."""
    if within is not None and within not in PROBED:
        raise ValueError(f"within must be one of {PROBED}, got {within!r}")
    train_x, train_y = read_embedded_shapes(train_pattern)
    test_x, test_y = read_embedded_shapes(test_pattern)
    report = _probe_rows(train_x, train_y, test_x, test_y)
    if two_objects:
        try:
            pairs = read_embedded_shapes(train_pattern, objects=2), read_embedded_shapes(test_pattern, objects=2)
        except FileNotFoundError as err:  # a one-object grammar (the demo's): the rows above still stand
            print(f"no two-object rows: {err}")
        else:
            report.update(_probe_rows(*pairs[0], *pairs[1], attributes=PAIR_PROBED))
    for value in sorted(set(train_y[within])) if within else ():
        train = _subset(train_x, train_y, [i for i, v in enumerate(train_y[within]) if v == value])
        test = _subset(test_x, test_y, [i for i, v in enumerate(test_y[within]) if v == value])
        report.update(_probe_rows(*train, *test, suffix=f"@{within}={value}"))  # `within` itself: one class, skipped
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="glob of embedded training shards")
    parser.add_argument("--test", required=True, help="glob of embedded test shards")
    parser.add_argument("--within", default=None, choices=PROBED,
                        help="also probe within each class of this attribute (e.g. size)")
    parser.add_argument("--two-objects", action="store_true",
                        help="also probe two-object scenes: the colour and shape of the left / top object")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        report = probe_report(args.train, args.test, args.within, args.two_objects)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"linear_probe: {err}") from None
    if not report:
        raise SystemExit("linear_probe: nothing to probe: every attribute has a single class in the training "
                         "shards, or the test shards have none of its samples")
    print(f"{'attribute':>24} {'classes':>7} {'test':>5} {'image_embed':>11} {'text_embed':>10} {'chance':>6} "
          f"{'bag':>5}")
    for attribute, row in report.items():
        bag = f"{row['bag']:>5.3f}" if "bag" in row else f"{'':>5}"
        print(f"{attribute:>24} {row['classes']:>7} {row['test']:>5} {row['image_embed']:>11.3f} "
              f"{row['text_embed']:>10.3f} {row['chance']:>6.3f} {bag}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
