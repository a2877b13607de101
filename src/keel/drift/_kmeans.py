"""Distances and k-means in numpy, for the embedding tests (matrix products throughout)."""

from __future__ import annotations

import numpy as np


def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of every row of x to every row of y (matrix products)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d, 0.0, out=d)


def _lloyd(
    x: np.ndarray, xx: np.ndarray, k: int, rng: np.random.Generator, iters: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """One k-means run; ``xx`` are the squared norms of the rows of x (computed once)."""
    n = len(x)

    def dists(c: np.ndarray) -> np.ndarray:
        d = xx[:, None] + np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (x @ c.T)
        return np.maximum(d, 0.0, out=d)

    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = x[rng.integers(n)]
    d2 = dists(centers[:1])[:, 0]
    for j in range(1, k):  # k-means++ seeding
        total = float(d2.sum())
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centers[j] = x[i]
        d2 = np.minimum(d2, dists(centers[j : j + 1])[:, 0])
    assign = np.full(n, -1)
    rows = np.arange(n)
    for _ in range(iters):
        new = dists(centers).argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
        onehot = np.zeros((k, n), dtype=np.float32)
        onehot[assign, rows] = 1.0
        counts = onehot.sum(1)
        sums = onehot @ x  # the members' sums, as one matrix product
        filled = counts > 0  # an emptied cluster keeps its centre
        centers[filled] = sums[filled] / counts[filled, None]
    d = dists(centers)
    assign = d.argmin(1)
    return centers, assign, float(d[rows, assign].sum())


def kmeans(
    x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25, restarts: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centroids, assignment of x). The best of
    a few restarts: one seeding can leave two centres in one topic and merge two others."""
    x = x.astype(np.float32, copy=False)
    k = max(1, min(k, len(x)))
    xx = np.einsum("ij,ij->i", x, x)
    best = min((_lloyd(x, xx, k, rng, iters) for _ in range(restarts)), key=lambda r: r[2])
    return best[0], best[1]


def nearest(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, distance to it) for every row of x."""
    d = sq_dists(x.astype(np.float32, copy=False), centers)
    a = d.argmin(1)
    return a, np.sqrt(d[np.arange(len(x)), a])
