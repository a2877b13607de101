"""Language of a text, offline: py3langid (a naive-Bayes byte n-gram model in numpy).

About 0.1 ms a text (bench/drift.py measures it). Short texts and texts the
model is unsure about are ``"unknown"``: a three-word greeting says little
about a language, and a guess there would add noise to the language feature.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("keel.drift")

UNKNOWN = "unknown"
#: Fewer letters than this: too short to tell.
MIN_LETTERS = 12
#: Below this normalised probability the guess is not kept.
MIN_CONFIDENCE = 0.5
#: The model reads at most this many characters (enough to tell; bounds the cost).
MAX_CHARS = 1000

_lock = threading.Lock()
_identifier: Any = None
_failed = False


def _get() -> Any:
    global _identifier, _failed
    if _identifier is None and not _failed:
        with _lock:
            if _identifier is None and not _failed:
                try:
                    from py3langid.langid import MODEL_FILE, LanguageIdentifier

                    _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
                except Exception as e:  # not installed or unreadable: no language feature
                    _failed = True
                    log.warning("language detection unavailable (py3langid): %s", e)
    return _identifier


def available() -> bool:
    """True when the language model could be loaded."""
    return _get() is not None


def detect_language(text: str | None) -> str:
    """ISO 639-1 code of ``text`` (``en``, ``fr``…), or ``"unknown"``."""
    if not text:
        return UNKNOWN
    head = text[:MAX_CHARS]
    if sum(1 for c in head if c.isalpha()) < MIN_LETTERS:
        return UNKNOWN
    ident = _get()
    if ident is None:
        return UNKNOWN
    lang, conf = ident.classify(head)
    return str(lang) if conf >= MIN_CONFIDENCE else UNKNOWN
