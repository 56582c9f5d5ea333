"""Linear probes: how much of each `shapes` attribute a CLIP embedding carries, read by a linear classifier.

    python -m unclip.eval.linear_probe --train '<embed out_dir>/train/*.tar' --test '<embed out_dir>/val/*.tar'

Reads shards written by `python -m unclip.data.embed` on `shapes` data (their `image_embed.npy`,
`text_embed.npy` and the generator's `json` attributes), fits one multinomial logistic regression per
(embedding, attribute) on the training shards (features standardised with the training mean and std, a small
L2 penalty, L-BFGS) and prints its accuracy on the test shards beside chance (the most frequent test class).
Only one-object scenes are probed: the attributes of a two-object scene do not name one class.
`--within size` adds one probe per size class, fitted and tested on that class's samples alone: an embedding can
hold shape for each size in its own directions, which one probe over all sizes misses (docs/RESULTS.md).

The decoder can draw only what its conditioning holds: a low image-embedding figure for an attribute caps the
decoder's ShapesEval for it whatever the decoder learns (docs/RESULTS.md uses this to choose the demo CLIP).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import tarfile
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PROBED: tuple[str, ...] = ("shape", "colour", "position", "size", "background")
EMBEDDINGS: tuple[str, ...] = ("image_embed", "text_embed")


def read_tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every file in one WebDataset tar shard (keys as the shard writes them)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_embedded_shapes(pattern: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Embeddings {name: (N, D) float32} and labels {attribute: N names} of the one-object samples in the
    shards matching `pattern` (sorted). Raises FileNotFoundError when nothing matches or no sample qualifies."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    embeds: dict[str, list[np.ndarray]] = {name: [] for name in EMBEDDINGS}
    labels: dict[str, list[str]] = {a: [] for a in PROBED}
    for path in paths:
        samples = read_tar_samples(path)
        for key in sorted(samples):
            sample = samples[key]
            if "json" not in sample or any(f"{name}.npy" not in sample for name in EMBEDDINGS):
                continue
            attributes = json.loads(sample["json"]).get("attributes") or {}
            objects = attributes.get("objects") or []
            if len(objects) != 1:
                continue
            for name in EMBEDDINGS:
                embeds[name].append(np.load(io.BytesIO(sample[f"{name}.npy"])).astype(np.float32))
            labels["background"].append(attributes["background"])
            for a in PROBED[:-1]:
                labels[a].append(objects[0][a])
    if not labels["shape"]:
        raise FileNotFoundError(f"no one-object `shapes` samples with {EMBEDDINGS} in {pattern!r} (is it the output "
                                "of `python -m unclip.data.embed` on `shapes` shards?)")
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


def _probe_rows(train_x: dict[str, torch.Tensor], train_y: dict[str, list[str]], test_x: dict[str, torch.Tensor],
                test_y: dict[str, list[str]], suffix: str = "") -> dict[str, dict[str, float]]:
    report = {}
    for attribute in PROBED:
        if len(set(train_y[attribute])) < 2 or not test_y[attribute]:
            continue  # a grammar that fixes the attribute (the demo's one size) has nothing to probe
        row: dict[str, float] = {name: linear_probe(train_x[name], train_y[attribute], test_x[name], test_y[attribute])
                                 for name in EMBEDDINGS}
        counts = np.unique(test_y[attribute], return_counts=True)[1]
        row["chance"] = float(counts.max() / counts.sum())
        row["classes"] = len(set(train_y[attribute]))
        row["test"] = len(test_y[attribute])
        report[attribute + suffix] = row
    return report


def _subset(x: dict[str, torch.Tensor], y: dict[str, list[str]], keep: list[int]):
    index = torch.tensor(keep, dtype=torch.long)
    return {k: v[index] for k, v in x.items()}, {k: [v[i] for i in keep] for k, v in y.items()}


def probe_report(train_pattern: str, test_pattern: str, within: str | None = None) -> dict[str, dict[str, float]]:
    """{attribute: {"image_embed": acc, "text_embed": acc, "chance": majority-class rate, "classes": n, "test": n}};
    with `within` (an attribute, e.g. "size") also {"<attribute>@<within>=<value>": row} for every other attribute,
    each probe fitted and tested on the samples whose `within` is that value."""
    if within is not None and within not in PROBED:
        raise ValueError(f"within must be one of {PROBED}, got {within!r}")
    train_x, train_y = read_embedded_shapes(train_pattern)
    test_x, test_y = read_embedded_shapes(test_pattern)
    report = _probe_rows(train_x, train_y, test_x, test_y)
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
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = probe_report(args.train, args.test, args.within)
    print(f"{'attribute':>24} {'classes':>7} {'test':>5} {'image_embed':>11} {'text_embed':>10} {'chance':>6}")
    for attribute, row in report.items():
        print(f"{attribute:>24} {row['classes']:>7} {row['test']:>5} {row['image_embed']:>11.3f} "
              f"{row['text_embed']:>10.3f} {row['chance']:>6.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
