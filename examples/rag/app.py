"""A small RAG application traced with Keel's SDK.

Eight short documents are embedded with ``local-embed`` through Keel's gateway,
kept in a numpy cosine index, and the best three are given as context to the
``local`` chat model. Every step is a span of one trace, and the gateway calls
join it (the HTTP client sends a ``traceparent``), so Keel shows the whole tree:

    rag.answer (chain)
    ├── index documents (embedding) ── keel.gateway embeddings
    ├── retrieve (retrieval)        ── keel.gateway embeddings
    └── generate answer (llm)       ── keel.gateway chat

    keel up                                   # in another terminal
    python examples/rag/app.py "How long do I have to return an item?"

``KEEL_URL`` is the gateway's OpenAI base URL (default http://127.0.0.1:4000/v1),
``KEEL_API_KEY`` a key when the gateway asks for one.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import openai

import keel

EMBED_MODEL = os.environ.get("RAG_EMBED_MODEL", "local-embed")
CHAT_MODEL = os.environ.get("RAG_CHAT_MODEL", "local")

DOCS = [
    "Returns: items can be returned within 30 days of delivery for a full refund.",
    "Refunds are paid to the original payment method within 5 business days.",
    "Shipping is free for orders over 50 euros; otherwise it costs 4.90 euros.",
    "Orders placed before 2 pm ship the same day from our warehouse in Lyon.",
    "Every product has a two-year warranty covering manufacturing defects.",
    "Support is available by chat from 9 am to 6 pm, Monday to Friday.",
    "Gift cards are valid for one year and cannot be exchanged for cash.",
    "You can change or cancel an order until it has been shipped.",
]


def urls() -> tuple[str, str]:
    """(OpenAI base URL, Keel root URL) from KEEL_URL."""
    base = os.environ.get("KEEL_URL", "http://127.0.0.1:4000/v1").rstrip("/")
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    return base, root


class Index:
    """Cosine similarity over unit vectors: one matrix product per query."""

    def __init__(self, docs: list[str], vectors: np.ndarray) -> None:
        self.docs = docs
        self.m = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        scores = self.m @ (query / np.linalg.norm(query))
        top = np.argsort(-scores)[:k]
        return [(int(i), self.docs[i], float(scores[i])) for i in top]


class Rag:
    """Index, retrieve, generate: each step a span (the methods' ``self`` is not recorded)."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.index: Index | None = None

    def embed(self, texts: list[str]) -> np.ndarray:
        resp = self.client.embeddings.create(model=EMBED_MODEL, input=texts)
        return np.array([d.embedding for d in resp.data], dtype=np.float32)

    def build_index(self) -> None:
        with keel.span("index documents", kind="embedding", documents=len(DOCS)):
            self.index = Index(DOCS, self.embed(DOCS))

    def retrieve(self, question: str, k: int = 3) -> list[str]:
        assert self.index is not None
        with keel.span("retrieve", kind="retrieval", input=question, top_k=k) as s:
            hits = self.index.search(self.embed([question])[0], k)
            s.set_result([{"id": i, "content": d} for i, d, _ in hits], [x for _, _, x in hits])
            return [d for _, d, _ in hits]

    @keel.observe(kind="llm", name="generate answer")
    def generate(self, question: str, context: list[str]) -> str:
        resp = self.client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[
                {
                    "role": "system",
                    "content": "Answer in one sentence using only this context:\n"
                    + "\n".join(f"- {c}" for c in context),
                },
                {"role": "user", "content": question},
            ],
            max_tokens=64,
            temperature=0,
        )
        return (resp.choices[0].message.content or "").strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Answer a question over a few documents.")
    ap.add_argument("question", nargs="?", default="How long do I have to return an item?")
    question = ap.parse_args(argv).question
    base, root = urls()
    key = os.environ.get("KEEL_API_KEY")
    keel.init(
        endpoint=root,
        service_name="rag-example",
        headers={"Authorization": f"Bearer {key}"} if key else None,
    )
    # The hook adds the current span's traceparent to every gateway call.
    http = openai.DefaultHttpxClient(event_hooks={"request": [keel.inject_traceparent]})
    client = openai.OpenAI(base_url=base, api_key=key or "keel", http_client=http, max_retries=0)
    try:
        rag = Rag(client)
        with keel.span("rag.answer", kind="chain", input=question) as s:
            rag.build_index()
            answer = rag.generate(question, rag.retrieve(question))
            s.set_output(answer)
            trace_id = s.trace_id
    finally:
        keel.shutdown()  # flush the spans before exiting
    print(answer)
    print(f"trace: {trace_id}")
    print(f"tree:  {root}/api/otel-traces/{trace_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
