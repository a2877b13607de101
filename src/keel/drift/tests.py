"""The drift tests: each compares a reference sample with a current one.

A test is one small class in :data:`DRIFT_TESTS` with a ``kind`` (``numeric``,
``categorical`` or ``embedding``) and ``run(ref, cur) -> TestResult``. Numeric
samples are 1-D float arrays without missing values, categorical ones arrays of
labels, embedding ones ``(n, d)`` float arrays of unit vectors.

Every test is vectorised numpy/scipy: 100k vs 100k numeric values take a few
milliseconds per test, 10k vs 10k embeddings well under a second
(``bench/drift.py``). ``TestConfig.alpha`` is the level of *one* test: the
monitor passes the run's budget divided by the number of tests it runs
(Bonferroni), so that a run on identically distributed data rarely calls drift.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from keel.drift._kmeans import kmeans, nearest, sq_dists

# Smoothing of empty bins: without it PSI is infinite as soon as one bin is empty.
PSI_EPS = 1e-4
PSI_BINS = 10
# Categories rarer than this (in both samples together) are pooled, so that the
# chi-squared approximation holds (expected counts of about 5 or more).
MIN_CATEGORY_COUNT = 5
# A cluster counts as grown (and gets examples) past this rise in share.
GROWN_DELTA = 0.05


@dataclass
class TestResult:
    """The outcome of one test. ``arrays`` carries working data for the report
    (cluster assignments); it is not stored."""

    __test__: ClassVar[bool] = False  # not a pytest class

    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    details: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": _num(self.statistic),
            "p_value": _num(self.p_value),
            "threshold": self.threshold,
            "drifted": bool(self.drifted),
            "details": self.details,
        }


@dataclass(frozen=True)
class TestConfig:
    """Parameters of the tests. ``alpha`` is per test (already corrected)."""

    __test__: ClassVar[bool] = False

    alpha: float = 0.01
    psi_threshold: float = 0.2
    js_threshold: float = 0.1
    wasserstein_threshold: float = 0.5
    clusters: int = 8
    far_margin: float = 0.1
    mmd_sample: int = 500
    permutations: int = 500
    cluster_sample: int = 1000
    seed: int = 0


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class DriftTest:
    """One statistical comparison of a reference sample and a current sample."""

    __test__: ClassVar[bool] = False

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # numeric | categorical | embedding
    description: ClassVar[str] = ""
    #: How many decisions the test makes (each is held to alpha): Bonferroni's m.
    decisions: ClassVar[int] = 1
    #: False: reported only, its verdict does not make a feature drifted.
    decisive: ClassVar[bool] = True

    def __init__(self, cfg: TestConfig | None = None) -> None:
        self.cfg = cfg or TestConfig()

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:  # pragma: no cover
        raise NotImplementedError


DRIFT_TESTS: dict[str, type[DriftTest]] = {}


def register_test(cls: type[DriftTest]) -> type[DriftTest]:
    DRIFT_TESTS[cls.name] = cls
    return cls


def tests_of_kind(kind: str) -> list[str]:
    """Names of the registered tests of one kind, in registration order."""
    return [n for n, c in DRIFT_TESTS.items() if c.kind == kind]


tests_of_kind.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


# -- numeric ----------------------------------------------------------------------------


def psi(ref: np.ndarray, cur: np.ndarray, bins: int = PSI_BINS) -> tuple[float, np.ndarray]:
    """Population stability index over the reference's quantile bins, and the bin edges."""
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    nb = len(edges) + 1
    # Bins are (-inf, e0], (e0, e1], …: a value equal to an edge stays below it, so on
    # discrete data (token counts) each edge separates two distinct values.
    r = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=nb) / len(ref)
    c = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=nb) / len(cur)
    r = np.maximum(r, PSI_EPS)
    c = np.maximum(c, PSI_EPS)
    return float(np.sum((c - r) * np.log(c / r))), edges


@register_test
class PSI(DriftTest):
    name, kind = "psi", "numeric"
    description = "Population stability index over 10 quantile bins of the reference."
    decisions = 0  # an effect size that gates KS, not a hypothesis test

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        value, edges = psi(ref, cur)
        t = self.cfg.psi_threshold
        return TestResult(value, None, t, value >= t, {"bins": len(edges) + 1})


_memo = threading.local()


def ecdf_gap(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct pooled values, F_ref - F_cur just after each): one merge of the two
    sorted samples gives both the KS statistic and the Wasserstein distance.

    The last result is kept (per thread, holding the arrays so their ids stay
    theirs): KS and Wasserstein on the same samples sort them once."""
    last = getattr(_memo, "last", None)
    if last is not None and last[0] is ref and last[1] is cur:
        return last[2]
    out = _ecdf_gap(ref, cur)
    _memo.last = (ref, cur, out)
    return out


def _ecdf_gap(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.sort(ref), np.sort(cur)
    z = np.concatenate([x, y])
    order = np.argsort(z, kind="stable")  # a merge of two sorted runs: linear
    gap = np.cumsum(np.where(order < len(x), 1.0 / len(x), -1.0 / len(y)))
    zs = z[order]
    last = np.append(zs[1:] != zs[:-1], True)  # the end of each run of ties
    return zs[last], gap[last]


def ks_2samp(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """Two-sided two-sample KS test: (D, p). Exact for small samples (scipy),
    else the asymptotic distribution of D, as scipy's ``method='asymp'``."""
    n, m = len(ref), len(cur)
    if n * m <= 250_000:  # the exact distribution costs O(n*m)
        with warnings.catch_warnings():
            # Where the exact computation fails scipy falls back to asymp: fine, and said.
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ks_2samp(ref, cur, method="exact")
        return float(res.statistic), float(res.pvalue)
    _, gap = ecdf_gap(ref, cur)
    d = float(np.abs(gap).max())
    en = n * m / (n + m)
    return d, float(np.clip(stats.kstwo.sf(d, np.round(en)), 0.0, 1.0))


def wasserstein(ref: np.ndarray, cur: np.ndarray) -> float:
    """1-D Wasserstein (earth mover's) distance: the area between the two CDFs."""
    v, gap = ecdf_gap(ref, cur)
    return float(np.sum(np.abs(gap[:-1]) * np.diff(v)))


@register_test
class KS(DriftTest):
    name, kind = "ks", "numeric"
    description = "Two-sample Kolmogorov-Smirnov test (largest gap between the CDFs)."

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        d, p = ks_2samp(ref, cur)
        return TestResult(d, p, self.cfg.alpha, p < self.cfg.alpha)


@register_test
class Wasserstein(DriftTest):
    name, kind = "wasserstein", "numeric"
    description = "Earth mover's distance, in units of the reference's IQR (report only)."
    decisive = False
    decisions = 0

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        raw = wasserstein(ref, cur)
        q1, q3 = np.quantile(ref, [0.25, 0.75])
        scale = float(q3 - q1) or float(np.std(ref)) or 1.0
        value = raw / scale
        t = self.cfg.wasserstein_threshold
        return TestResult(value, None, t, value >= t, {"distance": raw, "scale": scale})


# -- categorical ------------------------------------------------------------------------


def _labels(x: Sequence[Any] | np.ndarray) -> list[Any]:
    return x.tolist() if isinstance(x, np.ndarray) else list(x)


def category_counts(
    ref: Sequence[Any] | np.ndarray, cur: Sequence[Any] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(labels, reference counts, current counts) over the union of labels.

    Counted with ``Counter`` on Python values: several times faster than
    ``np.unique``, which sorts the strings."""
    rc = {str(k): v for k, v in Counter(_labels(ref)).items()}
    cc = {str(k): v for k, v in Counter(_labels(cur)).items()}
    labels = sorted(rc.keys() | cc.keys())
    r = np.array([rc.get(k, 0) for k in labels], dtype=np.int64)
    c = np.array([cc.get(k, 0) for k in labels], dtype=np.int64)
    return labels, r, c


def chi2_counts(r: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """Chi-squared test of homogeneity of two count vectors (rare cells pooled)."""
    rare = (r + c) < MIN_CATEGORY_COUNT
    if rare.any():
        r = np.append(r[~rare], r[rare].sum())
        c = np.append(c[~rare], c[rare].sum())
    keep = (r + c) > 0
    r, c = r[keep], c[keep]
    if len(r) < 2 or r.sum() == 0 or c.sum() == 0:
        return 0.0, 1.0
    stat, p, _, _ = stats.chi2_contingency(np.vstack([r, c]))
    return float(stat), float(p)


def js_distance(r: np.ndarray, c: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two count vectors."""
    if r.sum() == 0 or c.sum() == 0:
        return 0.0
    return float(jensenshannon(r / r.sum(), c / c.sum(), base=2))


def _top(labels: list[str], r: np.ndarray, c: np.ndarray, n: int = 8) -> list[dict[str, Any]]:
    rs, cs = r / max(r.sum(), 1), c / max(c.sum(), 1)
    order = np.argsort(-np.maximum(rs, cs), kind="stable")[:n]
    return [
        {"value": str(labels[i]), "ref_share": float(rs[i]), "cur_share": float(cs[i])}
        for i in order
    ]


@register_test
class ChiSquared(DriftTest):
    name, kind = "chi2", "categorical"
    description = "Chi-squared test of homogeneity of the category counts."

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        labels, r, c = category_counts(ref, cur)
        stat, p = chi2_counts(r, c)
        return TestResult(
            stat, p, self.cfg.alpha, p < self.cfg.alpha, {"categories": _top(labels, r, c)}
        )


@register_test
class JensenShannon(DriftTest):
    name, kind = "js", "categorical"
    description = "Jensen-Shannon distance of the category shares (0: same, 1: disjoint)."
    decisions = 0  # an effect size, not a hypothesis test

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        _, r, c = category_counts(ref, cur)
        d = js_distance(r, c)
        t = self.cfg.js_threshold
        return TestResult(d, None, t, d >= t)


# -- embeddings -------------------------------------------------------------------------


def _sample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[rng.choice(len(x), n, replace=False)]


def mmd_permutation(
    x: np.ndarray,
    y: np.ndarray,
    permutations: int,
    rng: np.random.Generator,
    alpha: float | None = None,
) -> tuple[float, float, float, int]:
    """(MMD², permutation p-value, kernel bandwidth, permutations run) with an RBF
    kernel whose bandwidth is the median pairwise distance.

    MMD² (the biased V-statistic) is ``s·K·s`` with ``s`` = +1/n on x and -1/m
    on y; a permutation shuffles ``s``, so a chunk of permutations is one
    matrix product with the kernel matrix. With ``alpha``, permutations stop as
    soon as the p-value can no longer fall below it (under no drift, after the
    first chunk); the p-value is then that of the permutations run.
    """
    z = np.vstack([x, y]).astype(np.float32, copy=False)
    n, m = len(x), len(y)
    d = sq_dists(z, z)
    iu = np.triu_indices(len(z), 1)
    med = float(np.median(d[iu])) or 1.0
    k = np.exp(d * np.float32(-1.0 / med), dtype=np.float32)
    s = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)]).astype(np.float32)
    observed = float(s @ k @ s)
    # Exceedances at which p = (1 + e) / (1 + B) is no longer below alpha.
    enough = math.inf if alpha is None else alpha * (1 + permutations) - 1
    exceed = done = 0
    chunk = 64
    while done < permutations and exceed < enough:
        b = min(chunk, permutations - done)
        perm = rng.permuted(np.broadcast_to(s, (b, len(s))), axis=1)
        vals = np.einsum("ij,ij->i", perm @ k, perm)
        # A small tolerance: float32 sums of equal statistics may differ in the last bit.
        exceed += int(np.count_nonzero(vals >= observed - 1e-7))
        done += b
        chunk = 256
    return observed, (1 + exceed) / (1 + done), math.sqrt(med), done


@register_test
class MMD(DriftTest):
    name, kind = "mmd", "embedding"
    description = "Maximum mean discrepancy (RBF kernel) with a permutation p-value."

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        x = _sample(ref, cfg.mmd_sample, rng)
        y = _sample(cur, cfg.mmd_sample, rng)
        # Enough permutations that the p-value can fall below alpha at all.
        b = min(20_000, max(cfg.permutations, math.ceil(2.0 / cfg.alpha)))
        stat, p, bw, done = mmd_permutation(x, y, b, rng, cfg.alpha)
        return TestResult(
            stat,
            p,
            cfg.alpha,
            p < cfg.alpha,
            {"n_ref": len(x), "n_cur": len(y), "permutations": done, "bandwidth": bw},
        )


@register_test
class TopicShift(DriftTest):
    """Topics are k-means clusters of (half of) the reference embeddings. The other
    half is held out: its cluster shares and its 95th percentile of distance to
    the nearest centre are what the current window is compared with, so both
    sides are measured on points the clusters were not fitted to."""

    name, kind = "topic", "embedding"
    description = "Shift in the share of traffic per topic, and of traffic far from every topic."
    decisions = 2  # shares (chi-squared) and the far-away share (Fisher)

    def run(self, ref: np.ndarray, cur: np.ndarray) -> TestResult:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + 1)
        order = rng.permutation(len(ref))
        half = len(ref) // 2
        fit = ref[order[:half][: cfg.cluster_sample]]
        held = ref[order[half:][: cfg.cluster_sample]]
        k = max(2, min(cfg.clusters, len(fit) // 10))
        centers, _ = kmeans(fit, k, rng)
        a_ref, d_ref = nearest(held, centers)
        a_cur, d_cur = nearest(cur, centers)
        radius = float(np.quantile(d_ref, 0.95))
        far_ref, far_cur = d_ref > radius, d_cur > radius
        r = np.bincount(a_ref, minlength=k)
        c = np.bincount(a_cur, minlength=k)
        chi, p_share = chi2_counts(r, c)
        js = js_distance(r, c)
        nf_ref, nf_cur = int(far_ref.sum()), int(far_cur.sum())
        far_ref_share, far_cur_share = nf_ref / len(held), nf_cur / len(cur)
        _, p_far = stats.fisher_exact(
            [[nf_cur, len(cur) - nf_cur], [nf_ref, len(held) - nf_ref]], alternative="greater"
        )
        p_far = float(p_far)
        share_moved = p_share < cfg.alpha and js >= cfg.js_threshold
        far_moved = p_far < cfg.alpha and far_cur_share - far_ref_share >= cfg.far_margin
        rs, cs = r / max(len(held), 1), c / max(len(cur), 1)
        clusters = [
            {
                "cluster": i,
                "ref_share": float(rs[i]),
                "cur_share": float(cs[i]),
                "delta": float(cs[i] - rs[i]),
                "grown": bool(cs[i] - rs[i] >= GROWN_DELTA),
            }
            for i in range(k)
        ]
        details = {
            "k": k,
            "chi2": chi,
            "p_share": p_share,
            "shares_moved": share_moved,
            "far": {
                "ref_share": far_ref_share,
                "cur_share": far_cur_share,
                "radius": radius,
                "p_value": p_far,
                "margin": cfg.far_margin,
                "moved": far_moved,
            },
            "clusters": clusters,
            "n_fit": len(fit),
            "n_ref": len(held),
            "n_cur": len(cur),
        }
        arrays = {
            "centers": centers,
            "cur_assign": a_cur,
            "cur_dist": d_cur,
            "cur_far": far_cur,
            "ref_assign": a_ref,
            "ref_dist": d_ref,
            "ref_index": order[half:][: cfg.cluster_sample],
        }
        return TestResult(
            js, min(p_share, p_far), cfg.js_threshold, share_moved or far_moved, details, arrays
        )
