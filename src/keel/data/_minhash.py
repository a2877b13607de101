"""Near-duplicate detection: batched MinHash signatures, LSH banding and
clustering of the verified pairs."""

from __future__ import annotations

import zlib

import numpy as np

# -- near duplicates -----------------------------------------------------------
#
# MinHash over word 3-gram shingles, computed for thousands of rows at once with
# numpy. The signatures are exactly datasketch's: MinHash(num_perm, scheme=
# "affine32", hashfunc=<the shingle hash>) updated with each row's shingles
# gives the same hash values (tested). The LSH banding is datasketch's too
# (MinHashLSH's optimal (bands, rows) for the threshold, weighted towards
# recall because every candidate pair is verified), but the buckets are built
# by sorting band keys in numpy: MinHashLSH keeps a Python set per bucket and
# band, gigabytes and minutes at a million rows.

_W1 = np.uint32(0x9E3779B1)
_W2 = np.uint32(0x85EBCA77)
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def shingle_hashes(word_hashes: np.ndarray) -> np.ndarray:
    """32-bit hashes of the word 3-grams of one row's word hashes (≥ 3 words)."""
    w = word_hashes.astype(np.uint32)
    return w[:-2] * _W1 + w[1:-1] * _W2 + w[2:]


def word_hashes(text: str) -> list[int]:
    """Deterministic 32-bit hashes of the lower-cased words, padded to 3 words."""
    words = text.lower().encode("utf-8", "surrogatepass").split()
    h = list(map(zlib.crc32, words))
    if 0 < len(h) < 3:
        h += [0] * (3 - len(h))
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s1)


class MinHasher:
    """Batched MinHash signatures (rows × num_perm, uint32)."""

    _CHUNK = 8192

    def __init__(self, num_perm: int = 64, seed: int = 1) -> None:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a = np.asarray(a, dtype=np.uint32)[:, None]
        self.b = np.asarray(b, dtype=np.uint32)[:, None]
        self.num_perm = num_perm

    def signatures(self, hashes: list[int], lengths: list[int]) -> np.ndarray:
        """``hashes``: the word hashes of several rows back to back, ``lengths``
        their word counts (each ≥ 3)."""
        w = np.fromiter(hashes, dtype=np.uint32, count=len(hashes))
        lens = np.asarray(lengths, dtype=np.int64)
        row = np.repeat(np.arange(len(lens)), lens)
        sh = shingle_hashes(w)[row[:-2] == row[2:]]
        ends = np.cumsum(lens - 2)
        offsets = np.concatenate(([0], ends[:-1]))
        hv = _fmix32(sh)
        n = len(lens)
        out = np.empty((self.num_perm, n), dtype=np.uint32)
        # (num_perm, shingles), wrapping mod 2^32, a few thousand shingles at a
        # time (whole rows) in one reused buffer that stays in cache.
        chunk = self._CHUNK
        buf = np.empty((self.num_perm, chunk + int(lens.max())), dtype=np.uint32)
        r0 = 0
        while r0 < n:
            s0 = int(offsets[r0])
            r1 = max(r0 + 1, int(np.searchsorted(ends, s0 + chunk, side="right")))
            s1 = int(ends[r1 - 1])
            v = buf[:, : s1 - s0]
            np.multiply(self.a, hv[None, s0:s1], out=v)
            v += self.b
            np.minimum.reduceat(v, offsets[r0:r1] - s0, axis=1, out=out[:, r0:r1])
            r0 = r1
        return out.T.copy()


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.2, 0.8)


def near_duplicate_pairs(
    sigs: np.ndarray, threshold: float, bands: int, rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, similarity) for the verified candidate pairs of the LSH buckets;
    each bucket member is paired with the bucket's first row."""
    n = len(sigs)
    if n < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0)
    rng = np.random.default_rng(7)
    mult = rng.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (cols * mult).sum(axis=1, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = sk[1:] == sk[:-1]
        if not same.any():
            continue
        run_start = np.maximum.accumulate(
            np.where(np.concatenate(([True], ~same)), np.arange(n), 0)
        )
        members = order[1:][same]
        leaders = order[run_start[1:][same]]
        pairs.append(np.minimum(leaders, members) * n + np.maximum(leaders, members))
    if not pairs:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0)
    uniq = np.unique(np.concatenate(pairs))
    a, b = uniq // n, uniq % n
    sim = np.empty(len(a))
    for s in range(0, len(a), 200_000):  # bounded memory for huge buckets
        sim[s : s + 200_000] = (sigs[a[s : s + 200_000]] == sigs[b[s : s + 200_000]]).mean(axis=1)
    keep = sim >= threshold
    return a[keep], b[keep], sim[keep]


def _clusters(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for x in set(a.tolist()) | set(b.tolist()):
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values())
