"""Train an intent classifier on the CPU (numpy softmax regression) and track it with Keel.

Run by the pipeline's train step, which sets KEEL_RUN_ID (a pending run),
KEEL_URL, KEEL_API_KEY, KEEL_PARAMS and DATASET (the validated dataset version).
The training curve (loss, accuracy per epoch) goes to the run; the weights and
a model card are the run's artifact ``model``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from features import DIM, dataset_rows, featurize

import keel


def main() -> None:
    params = {"epochs": 300, "lr": 2.0, "l2": 1e-3, "seed": 0}
    params.update(json.loads(os.environ.get("KEEL_PARAMS") or "{}"))
    ref = os.environ["DATASET"]
    url = os.environ.get("KEEL_URL", "http://127.0.0.1:4000").rstrip("/")
    with keel.run("train-intents", params=params, system_metrics=False) as run:
        rows = dataset_rows(url, os.environ.get("KEEL_API_KEY"), ref, "train")
        labels = sorted({r["expected"] for r in rows})
        x = featurize([r["input"] for r in rows])
        y = np.array([labels.index(r["expected"]) for r in rows])
        onehot = np.eye(len(labels))[y]
        rng = np.random.default_rng(params["seed"])
        w = rng.normal(0, 0.01, (DIM, len(labels)))
        b = np.zeros(len(labels))
        for epoch in range(int(params["epochs"])):
            logits = x @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)) + params["l2"] * (w**2).sum()
            grad = (p - onehot) / len(y)
            w -= params["lr"] * (x.T @ grad + 2 * params["l2"] * w)
            b -= params["lr"] * grad.sum(axis=0)
            acc = float((p.argmax(axis=1) == y).mean())
            run.log_metrics({"loss": float(loss), "train_accuracy": acc}, step=epoch)
        print(f"trained on {len(rows)} rows: final loss {loss:.4f}, train accuracy {acc:.3f}")
        out = Path(tempfile.mkdtemp(prefix="keel-train-")) / "model"
        out.mkdir()
        np.savez(out / "weights.npz", w=w, b=b, labels=np.array(labels), dim=DIM)
        (out / "MODEL_CARD.md").write_text(
            f"# Intent classifier\n\nSoftmax regression over hashed word uni/bigrams "
            f"({DIM} features), trained with numpy on the CPU.\n\n- dataset: {ref} (train split,"
            f" {len(rows)} rows)\n- labels: {', '.join(labels)}\n- params: {params}\n"
            f"- final loss {loss:.4f}, train accuracy {acc:.3f}\n",
            encoding="utf-8",
        )
        run.log_artifact(out)


if __name__ == "__main__":
    main()
