"""The machine's own speed, recorded beside benchmark and demo times so they compare across machines."""

from __future__ import annotations

import time


def matmul_flops_per_s(n: int = 2048, repeats: int = 8) -> float:
    """fp32 matmul rate at torch's current thread count: the best of `repeats` n x n x n products (2 n^3 FLOPs
    each), the first left out as a warm-up when there are more; a ceiling no net's step reaches."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[1:] or times)
