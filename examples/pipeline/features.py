"""Text features shared by train.py and evaluate.py: hashed word unigrams and bigrams."""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np

DIM = 512


def featurize(texts: list[str], dim: int = DIM) -> np.ndarray:
    """One L2-normalised row of hashed unigram+bigram counts per text."""
    x = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9']+", t.lower())
        for tok in words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]:
            h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=4).digest(), "little")
            x[i, h % dim] += 1.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-9)


def dataset_rows(url: str, key: str | None, ref: str, split: str) -> list[dict]:
    """A split of a dataset version, read through Keel's API (small datasets: ≤500 rows)."""
    import httpx

    name, _, version = ref.partition("@")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(
        f"{url}/api/datasets/{name}/versions/{version}",
        params={"split": split, "limit": 500},
        headers=headers,
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["preview"]
