"""Built-in dataset-wide checks: duplicates, near duplicates, train/holdout
leakage, personal data and label balance."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

# Registration order is the order of a report's results: the per-row checks
# come first, whichever of the two modules is imported first.
from keel.data import _checks_row  # noqa: F401
from keel.data._check_base import (
    MAX_EXAMPLES,
    Check,
    Context,
    _canon,
    _content_text,
    _digest,
    register_check,
)
from keel.data._minhash import MinHasher, _clusters, lsh_params, near_duplicate_pairs, word_hashes
from keel.data.report import CheckResult

_HOLDOUT = {"validation", "valid", "val", "dev", "test", "eval", "holdout"}


@register_check
class DuplicatesCheck(Check):
    name = "duplicates"
    severity = "warning"
    description = "exact duplicates (same canonical text)"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.seen: dict[bytes, int] = {}

    def feed(self, i: int, row: dict[str, Any]) -> None:
        first = self.seen.setdefault(self.ctx.digest(row), i)
        if first != i:
            self.flag(i, f"same as row {first}", duplicate_of=first)

    def finish(self) -> CheckResult:
        return self.result(unique_rows=len(self.seen))


@register_check
class NearDuplicatesCheck(Check):
    name = "near_duplicates"
    severity = "warning"
    description = "near duplicates (MinHash/LSH over word 3-grams)"

    _BATCH = 4096

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.threshold = float(ctx.options.get("threshold", 0.85))
        self.hasher = MinHasher(int(ctx.options.get("num_perm", 128)))
        # Candidates are gathered for a lower threshold and the estimate is then
        # checked with a margin of about one standard error, so pairs just above
        # the threshold are not lost to the estimate's noise (recall over
        # precision for a warning-level check).
        self.margin = float(ctx.options.get("margin", 0.03))
        self.bands, self.rows_per_band = lsh_params(
            max(0.5, self.threshold - 0.1), self.hasher.num_perm
        )
        self.seen: set[bytes] = set()
        self.hbuf: list[int] = []
        self.lbuf: list[int] = []
        self.ibuf: list[int] = []
        self.sigs: list[np.ndarray] = []
        self.index: list[np.ndarray] = []

    def feed(self, i: int, row: dict[str, Any]) -> None:
        d = self.ctx.digest(row)
        if d in self.seen:  # exact duplicates are the duplicates check's
            return
        self.seen.add(d)
        h = word_hashes(self.ctx.plain(row))
        if not h:
            return
        self.hbuf += h
        self.lbuf.append(len(h))
        self.ibuf.append(i)
        if len(self.ibuf) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.ibuf:
            self.sigs.append(self.hasher.signatures(self.hbuf, self.lbuf))
            self.index.append(np.asarray(self.ibuf, dtype=np.int64))
        self.hbuf, self.lbuf, self.ibuf = [], [], []

    def finish(self) -> CheckResult:
        self._flush()
        details: dict[str, Any] = {
            "threshold": self.threshold,
            "num_perm": self.hasher.num_perm,
            "bands": self.bands,
            "rows_per_band": self.rows_per_band,
            "clusters": 0,
        }
        if not self.sigs:
            return self.result(**details)
        sigs = np.concatenate(self.sigs)
        index = np.concatenate(self.index)
        self.sigs = []
        a, b, sim = near_duplicate_pairs(
            sigs, self.threshold - self.margin, self.bands, self.rows_per_band
        )
        best = {}
        for x, y, s in zip(a.tolist(), b.tolist(), sim.tolist(), strict=True):
            best[y] = (x, s) if y not in best or s > best[y][1] else best[y]
        clusters = [[int(index[k]) for k in g] for g in _clusters(len(sigs), a, b)]
        for g in clusters:
            self.count += len(g) - 1
        for g in clusters[:MAX_EXAMPLES]:
            pos = int(np.searchsorted(index, g[1]))
            x, s = best.get(pos, (None, self.threshold))
            of = int(index[x]) if x is not None else g[0]
            self.examples.append(
                {
                    "row": g[1],
                    "reason": f"near-duplicate of row {of} (similarity ≈ {s:.2f}); "
                    f"cluster of {len(g)}",
                    "cluster": g[:20],
                }
            )
        details["clusters"] = len(clusters)
        details["largest_cluster"] = max(len(g) for g in clusters) if clusters else 0
        if self.ctx.options.get("all_clusters"):
            details["all_clusters"] = clusters
        return self.result(**details)


def _split_side(split: Any) -> str | None:
    if not isinstance(split, str):
        return None
    s = split.strip().lower()
    if s in ("train", "training"):
        return "train"
    return s if s in _HOLDOUT else None


@register_check
class LeakageCheck(Check):
    name = "leakage"
    description = "train inputs that reappear in validation/test"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.train: dict[bytes, int] = {}
        self.holdout: list[tuple[int, bytes, str]] = []

    def _key(self, row: dict[str, Any]) -> bytes:
        kind = self.ctx.kind
        parts = self.ctx.chat(row)
        if parts is not None:
            roles, texts = parts
            text = "\n".join([t for r, t in zip(roles, texts, strict=True) if r == "user"])
        elif kind == "chat":
            msgs = row.get("messages")
            text = (
                "\n".join(
                    _content_text(m.get("content"))
                    for m in msgs
                    if isinstance(m, dict) and m.get("role") == "user"
                )
                if isinstance(msgs, list)
                else ""
            )
        elif kind == "completion":
            text = _canon(row.get("prompt"))
        else:
            text = _canon(row.get("input"))
        return _digest(text)

    def feed(self, i: int, row: dict[str, Any]) -> None:
        side = _split_side(row.get("split"))
        if side is None:
            return
        key = self._key(row)
        if side == "train":
            self.train.setdefault(key, i)
        else:
            self.holdout.append((i, key, side))

    def finish(self) -> CheckResult:
        splits: Counter[str] = Counter()
        for i, key, side in self.holdout:
            t = self.train.get(key)
            if t is not None:
                splits[side] += 1
                what = "user turns" if self.ctx.kind == "chat" else "input"
                self.flag(i, f"{side} row: its {what} also in train (row {t})", train_row=t)
        return self.result(
            train_rows=len(self.train), holdout_rows=len(self.holdout), by_split=dict(splits)
        )


@register_check
class PiiCheck(Check):
    name = "pii"
    severity = "warning"
    description = "personal data (the gateway's redaction detectors)"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        from keel.gateway.redact import Redactor

        self.redactor = Redactor(ctx.options.get("patterns") or None)
        self.by_kind: Counter[str] = Counter()

    def feed(self, i: int, row: dict[str, Any]) -> None:
        found = self.redactor.detect(self.ctx.plain(row))
        if found:
            self.by_kind.update(found)
            self.flag(i, ", ".join(f"{k} ×{v}" for k, v in sorted(found.items())), kinds=found)

    def finish(self) -> CheckResult:
        return self.result(by_kind=dict(self.by_kind))


@register_check
class LabelBalanceCheck(Check):
    name = "label_balance"
    severity = "warning"
    description = "class balance of classification-style labels"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.labels: Counter[str] = Counter()
        self.rows: dict[str, list[int]] = {}
        self.explicit = 0
        self.implicit_ok = True
        self.ratio = float(ctx.options.get("min_ratio", 0.1))

    def feed(self, i: int, row: dict[str, Any]) -> None:
        md = row.get("metadata")
        exp = row.get("expected")
        label: Any = None
        if isinstance(md, dict) and md.get("label") is not None:
            label, self.explicit = md["label"], self.explicit + 1
        elif isinstance(exp, dict) and exp.get("label") is not None:
            label, self.explicit = exp["label"], self.explicit + 1
        elif self.ctx.kind == "eval" and isinstance(exp, str):
            label = exp.strip()
            if len(label) > 40 or "\n" in label:
                self.implicit_ok = False
        if label is None:
            return
        label = _canon(label)
        self.labels[label] += 1
        seen = self.rows.setdefault(label, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(i)

    def finish(self) -> CheckResult:
        n = sum(self.labels.values())
        classes = dict(self.labels.most_common())
        if not n:
            return self.result(labeled_rows=0, classes={})
        implicit = not self.explicit
        if len(classes) > 50 or (implicit and (not self.implicit_ok or n < 2 * len(classes))):
            return self.result(labeled_rows=n, classes={}, skipped="not classification-style")
        top = max(classes.values())
        if len(classes) < 2:
            only = next(iter(classes))
            self.flag(self.rows[only][0], f"only one class: {only!r}")
        else:
            for label, c in classes.items():
                if c < self.ratio * top:
                    self.count += 1
                    for r in self.rows[label][: MAX_EXAMPLES - len(self.examples)]:
                        self.examples.append(
                            {
                                "row": r,
                                "reason": f"class {label!r}: {c} rows vs {top} (most common)",
                            }
                        )
        return self.result(labeled_rows=n, classes=classes, min_ratio=self.ratio)
