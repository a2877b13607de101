"""Semantic similarity: cosine of the embeddings of the output and the expected answer.

The embeddings come from any embedding model behind the gateway (``local-embed``,
the bundled all-MiniLM-L6-v2, by default), so the calls are recorded and priced.
Output and expected answers of one case go in one embeddings request; with a
list of acceptable answers the best one counts.
"""

from __future__ import annotations

import inspect
import math

from pydantic import Field

from keel.evals.base import EvalCase, EvalOptions, Evaluator, Score, register_evaluator
from keel.evals.evaluators._util import error_score, expected_texts, missing_expected, no_output

FEATURE = "keel:eval:semantic"


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity; 0.0 when either vector is zero."""
    if len(a) != len(b):
        raise ValueError(f"vectors of different sizes ({len(a)} and {len(b)})")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 0.0
    return max(-1.0, min(1.0, dot / (na * nb)))


class SemanticOptions(EvalOptions):
    model: str = Field("local-embed", min_length=1, description="Embedding model alias.")
    threshold: float | None = Field(0.8, ge=-1, le=1, description="passed = value >= threshold.")
    clip_negative: bool = Field(
        True, description="Report negative cosines as 0 (values stay in [0, 1])."
    )


@register_evaluator
class SemanticSimilarity(Evaluator):
    kind = "semantic_similarity"
    description = "Cosine similarity of output and expected embeddings (gateway model)."
    Options = SemanticOptions
    requires_expected = True
    uses_model = True

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        wanted = expected_texts(case.expected)
        if wanted is None:
            return missing_expected(self.kind)
        o: SemanticOptions = self.options  # type: ignore[assignment]
        assert self.client is not None  # build_evaluator guarantees it
        texts = [case.output or "", *wanted]
        try:
            if _takes_feature(self.client.embed):
                vectors = await self.client.embed(texts, o.model, feature=FEATURE)  # type: ignore[call-arg]
            else:  # the bare ModelClient protocol
                vectors = await self.client.embed(texts, o.model)
        except Exception as e:
            return error_score(
                f"embedding model {o.model!r} failed: {e}",
                retryable=_retryable(e),
            )
        out, rest = vectors[0], vectors[1:]
        sims = [cosine(out, v) for v in rest]
        best = max(range(len(sims)), key=sims.__getitem__)
        raw = sims[best]
        value = max(0.0, raw) if o.clip_negative else raw
        return self.finish(
            Score(
                value=round(value, 6),
                details={"model": o.model, "cosine": raw, "closest": wanted[best][:200]},
            )
        )


def _takes_feature(fn: object) -> bool:
    try:
        return "feature" in inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _retryable(e: Exception) -> bool:
    """Worth another try later: the gateway or upstream was down, slow or limiting."""
    status = getattr(e, "status", None)
    return status is None or status in (408, 429) or status >= 500
