"""Evaluate the trained classifier on the test split; the pipeline gates on ``accuracy``.

TRAIN_RUN is the training run: its ``model`` artifact is downloaded through
Keel's API, so this works wherever the training ran.
"""

from __future__ import annotations

import io
import os

import httpx
import numpy as np
from features import dataset_rows, featurize

import keel


def main() -> None:
    url = os.environ.get("KEEL_URL", "http://127.0.0.1:4000").rstrip("/")
    key = os.environ.get("KEEL_API_KEY")
    ref, train_run = os.environ["DATASET"], os.environ["TRAIN_RUN"]
    with keel.run("evaluate-intents", system_metrics=False) as run:
        run.log_dataset(ref)
        r = httpx.get(
            f"{url}/api/runs/{train_run}/artifacts/file",
            params={"path": "model/weights.npz"},
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=60,
        )
        r.raise_for_status()
        m = np.load(io.BytesIO(r.content))
        labels = list(m["labels"])
        rows = dataset_rows(url, key, ref, "test")
        pred = (featurize([x["input"] for x in rows], int(m["dim"])) @ m["w"] + m["b"]).argmax(1)
        acc = float(np.mean([labels[p] == x["expected"] for p, x in zip(pred, rows, strict=True)]))
        run.log_params({"train_run": train_run, "test_rows": len(rows)})
        run.log_metric("accuracy", acc)
        print(f"test accuracy {acc:.3f} on {len(rows)} rows")


if __name__ == "__main__":
    main()
