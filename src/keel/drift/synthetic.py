"""Synthetic support traffic for drift tests and benchmarks.

Questions on a few topics (billing, shipping, account) in English, French and
Spanish, written from templates with random slots, optionally padded with
context (a length shift); and ``traces`` rows as the gateway records them for
the fake upstream (which echoes the question), so the featurizer reads them
through its normal path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from keel._ids import new_id

_SLOTS = {
    "amount": ["$12", "$49.99", "$5", "$120", "€30", "$19.90", "$300"],
    "card": ["Visa", "Mastercard", "credit card", "debit card", "Amex card"],
    "plan": ["basic", "pro", "team", "enterprise", "starter"],
    "month": ["January", "March", "May", "July", "September", "November"],
    "city": ["Lyon", "Denver", "Madrid", "Osaka", "Leeds", "Porto", "Austin"],
    "days": ["three", "five", "ten", "two", "seven"],
    "device": ["phone", "laptop", "tablet", "work computer"],
}

TOPICS: dict[str, dict[str, list[str]]] = {
    "billing": {
        "en": [
            "Why was I charged {amount} twice on my {card} this month?",
            "How do I download the invoice for my {plan} subscription from {month}?",
            "Can I change the billing address used for my {plan} plan invoices?",
            "Please refund the {amount} fee that appeared on my last statement.",
            "My {card} payment for the {plan} plan failed, how do I pay the invoice?",
            "What will I be charged if I upgrade from {plan} to the enterprise plan?",
            "The invoice from {month} shows {amount} of tax, is that correct?",
            "How do I switch my subscription payments from {card} to bank transfer?",
        ],
        "fr": [
            "Pourquoi ai-je été débité deux fois de {amount} sur ma carte ce mois-ci ?",
            "Comment télécharger la facture de mon abonnement {plan} du mois de {month} ?",
            "Puis-je modifier l'adresse de facturation de mon forfait {plan} ?",
            "Merci de rembourser les frais de {amount} sur mon dernier relevé.",
            "Le paiement de mon forfait {plan} a échoué, comment régler la facture ?",
            "Combien vais-je payer si je passe du forfait {plan} à l'offre entreprise ?",
        ],
        "es": [
            "¿Por qué me cobraron {amount} dos veces en mi tarjeta este mes?",
            "¿Cómo descargo la factura de mi suscripción {plan} del mes de {month}?",
            "¿Puedo cambiar la dirección de facturación de mi plan {plan}?",
            "Por favor, devuélvanme el cargo de {amount} de mi último extracto.",
            "El pago de mi plan {plan} ha fallado, ¿cómo pago la factura pendiente?",
            "¿Cuánto me cobrarán si cambio del plan {plan} al plan empresarial?",
        ],
    },
    "shipping": {
        "en": [
            "Where is my package? The tracking page has not moved for {days} days.",
            "My parcel to {city} has been stuck in transit for {days} days.",
            "Can you ship my order to {city} instead of my home address?",
            "The courier left my box at the wrong address in {city}.",
            "How long does express delivery to {city} usually take?",
            "My order arrived damaged, the box was crushed during delivery.",
            "Can I pick up my parcel at a depot in {city} rather than wait at home?",
            "The delivery driver never came although the app said out for delivery.",
        ],
    },
    "account": {
        "en": [
            "I cannot log in to my account from my {device}, the password is rejected.",
            "How do I turn on two-factor authentication for my {device}?",
            "Please delete my account and all the data you keep about me.",
            "I want to change the email address of my {plan} account.",
            "Someone else signed in to my account from {city}, what should I do?",
        ],
    },
}

#: Context a long question carries (a length shift), in English.
_CONTEXT = [
    "I have been a customer for several years and never had this problem before.",
    "I already contacted support twice last week and nobody answered my emails.",
    "This is urgent because my manager needs the documents for the audit tomorrow.",
    "I tried the steps described in your help center but they did not work for me.",
    "My colleague told me that the same thing happened to her account in {month}.",
]


def _fill(template: str, rng: np.random.Generator) -> str:
    out = template
    for key, values in _SLOTS.items():
        slot = "{" + key + "}"
        while slot in out:
            out = out.replace(slot, values[int(rng.integers(len(values)))], 1)
    return out


def questions(
    topic: str, n: int, rng: np.random.Generator, *, lang: str = "en", long: bool = False
) -> list[str]:
    """``n`` questions on ``topic`` in ``lang``; ``long`` adds 3-5 sentences of context."""
    templates = TOPICS[topic][lang]
    out = []
    for _ in range(n):
        q = _fill(templates[int(rng.integers(len(templates)))], rng)
        if long:
            k = int(rng.integers(3, 6))
            ctx = [_fill(_CONTEXT[int(i)], rng) for i in rng.permutation(len(_CONTEXT))[:k]]
            q = " ".join([*ctx, q])
        out.append(q)
    return out


def mix(
    parts: list[tuple[str, str, float]], n: int, rng: np.random.Generator, long: bool = False
) -> list[str]:
    """``n`` questions drawn from (topic, lang, share) parts, shuffled."""
    shares = np.array([p[2] for p in parts], dtype=float)
    counts = rng.multinomial(n, shares / shares.sum())
    out: list[str] = []
    for (topic, lang, _), k in zip(parts, counts, strict=True):
        out += questions(topic, int(k), rng, lang=lang, long=long)
    return [out[i] for i in rng.permutation(len(out))]


def trace_rows(
    texts: list[str],
    start_ms: int,
    end_ms: int,
    rng: np.random.Generator,
    *,
    model: str = "gpt",
    latency_ms: float = 400.0,
) -> list[dict[str, Any]]:
    """``traces`` rows of successful chat calls spread over [start_ms, end_ms), as the
    gateway records calls to the fake upstream (which answers ``Echo: <question>``)."""
    times = np.sort(rng.integers(start_ms, end_ms, len(texts)))
    rows = []
    for q, t in zip(texts, times, strict=True):
        req = {"model": model, "messages": [{"role": "user", "content": q}]}
        answer = f"Echo: {q}"
        resp = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": answer},
                }
            ],
        }
        pt, ct = len(q.split()) + 3, len(answer.split())
        rows.append(
            {
                "id": new_id(),
                "started_at_ms": int(t),
                "duration_ms": float(rng.lognormal(np.log(latency_ms), 0.3)),
                "endpoint": "chat",
                "model": model,
                "provider": "fake",
                "status": "ok",
                "http_status": 200,
                "stream": False,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "total_tokens": pt + ct,
                "tokens_estimated": False,
                "request_body": orjson.dumps(req).decode(),
                "response_body": orjson.dumps(resp).decode(),
            }
        )
    return rows
