"""Synthetic regression data: y = sum(x) plus Gaussian noise, drawn from a private generator.

``ToyRegressionData(n_samples=...)`` uses it (and re-exports it as ``batchlab.data.make_synthetic``). It lives in
a module of its own that imports only torch, so that ``scripts/bench.py`` can build the same data for the plain
loops it measures without importing Lightning into them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_synthetic(
    n_samples: int,
    n_features: int = 2,
    noise: float = 0.0,
    x_range: tuple[float, float] = (0.0, 10.0),
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Draw ``x`` uniformly from ``x_range`` and return ``(x, x.sum(1) + noise * N(0, 1))`` as float32.

    A private generator seeded with ``seed`` is used, so the global RNG (model init, shuffling) is untouched.
    """
    g = torch.Generator().manual_seed(seed)
    low, high = x_range
    # In place: the same values as ``rand * (high - low) + low``, without two temporaries the size of the data.
    x = torch.rand(n_samples, n_features, generator=g).mul_(high - low).add_(low)
    y = x.sum(dim=1, keepdim=True)
    if noise > 0:
        y.add_(torch.randn(n_samples, 1, generator=g).mul_(noise))
    return x, y
