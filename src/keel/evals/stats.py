"""Statistics of experiments: bootstrap intervals, paired tests, wins/losses/ties.

Everything is vectorized with numpy and seeded, so a report is reproducible:
the same scores give the same intervals and p-values. Bootstrap resamples are
drawn in chunks to bound memory (``n × resamples`` indexes at most ~4M at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
_CHUNK_CELLS = 4_000_000
TIE_EPS = 1e-9


def _means_of_resamples(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    out = np.empty(resamples)
    step = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        out[start : start + k] = x[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean; (None, None) without values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    means = _means_of_resamples(x, resamples, np.random.default_rng(seed))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


@dataclass
class PairedResult:
    """B minus A over paired items."""

    n: int
    mean_a: float | None
    mean_b: float | None
    delta: float | None  # mean of (b - a)
    ci_low: float | None
    ci_high: float | None
    p_value: float | None  # two-sided, sign-flip permutation test of the mean difference
    wins: int  # items where B scores higher
    losses: int  # items where B scores lower
    ties: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def wins_losses_ties(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, eps: float = TIE_EPS
) -> tuple[int, int, int]:
    """(wins, losses, ties) of B against A, item by item."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    wins = int(np.count_nonzero(d > eps))
    losses = int(np.count_nonzero(d < -eps))
    return wins, losses, int(d.size - wins - losses)


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> PairedResult:
    """Compare paired scores: mean delta, its bootstrap CI, and a permutation p-value.

    Under the null hypothesis (A and B are interchangeable) each item's
    difference is as likely to have either sign, so the p-value is the share
    of random sign flips whose mean difference is at least as far from zero as
    the observed one (with the +1 correction, so it is never exactly 0).
    Identical runs give delta 0 and p = 1.
    """
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError("paired samples must have the same length")
    n = int(xa.size)
    if n == 0:
        return PairedResult(0, None, None, None, None, None, None, 0, 0, 0)
    d = xb - xa
    delta = float(d.mean())
    lo, hi = bootstrap_ci(d, confidence=confidence, resamples=resamples, seed=seed)
    wins, losses, ties = wins_losses_ties(xa, xb)
    if np.all(np.abs(d) <= TIE_EPS):
        p = 1.0
    else:
        rng = np.random.default_rng(seed + 1)
        observed = abs(delta)
        extreme = 0
        step = max(1, _CHUNK_CELLS // n)
        for start in range(0, resamples, step):
            k = min(step, resamples - start)
            signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
            perm = np.abs((signs * d).mean(axis=1))
            extreme += int(np.count_nonzero(perm >= observed - 1e-12))
        p = (extreme + 1) / (resamples + 1)
    return PairedResult(
        n=n,
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        delta=delta,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        wins=wins,
        losses=losses,
        ties=ties,
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100, linear interpolation), or None without values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))
