"""Retrieval accuracy within groups of pairs with distinct captions.

"Recall@k among 100 validation pairs" is only meaningful when no two pairs in a group share a caption (a
duplicate caption makes the right answer ambiguous). Pairs are dealt into groups of `group_size` with
distinct captions; a group smaller than `min_group` is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["distinct_caption_groups", "grouped_recall"]


def distinct_caption_groups(captions: Sequence[str], group_size: int = 100, min_group: int = 2) -> list[list[int]]:
    """Indices dealt greedily into groups of up to `group_size` pairs whose captions are all distinct."""
    groups: list[list[int]] = []
    seen: list[set[str]] = []
    for i, caption in enumerate(captions):
        key = " ".join(caption.lower().split())
        for group, keys in zip(groups, seen):
            if len(group) < group_size and key not in keys:
                group.append(i)
                keys.add(key)
                break
        else:
            groups.append([i])
            seen.append({key})
    return [g for g in groups if len(g) >= min_group]


def grouped_recall(queries: torch.Tensor, keys: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5),
                   group_size: int = 100) -> dict[int, float]:
    """Recall@k of query i retrieving key i by cosine, averaged over pairs, within distinct-caption groups.

    queries, keys: (N, D). Returns {k: recall} (empty when no group has two pairs). Ties count against the
    query and a non-finite similarity never wins, so constant, all-zero or NaN embeddings score chance or
    below, not a perfect recall.
    """
    groups = distinct_caption_groups(captions, group_size)
    hits = {k: 0.0 for k in ks}
    total = 0
    q, kk = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    for group in groups:
        idx = torch.tensor(group, device=q.device)
        sims = q[idx] @ kk[idx].T  # (G, G)
        right = sims.diagonal().nan_to_num(nan=-torch.inf)[:, None]  # (G, 1): a NaN right answer scores lowest
        rank = (sims.nan_to_num(nan=torch.inf) >= right).sum(dim=1) - 1  # other keys at least as close (ties lose)
        for k in ks:
            hits[k] += float((rank < k).sum())
        total += len(group)
    return {k: hits[k] / total for k in ks} if total else {}
