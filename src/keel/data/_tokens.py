"""Token counting for the token_length check: tokenizer resolution and the
counters (llama.cpp, Hugging Face tokenizers, tiktoken, a chars/4 estimate)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keel.errors import InvalidRequest

# -- token counting -------------------------------------------------------------
#
# Tokenizer resolution (first that applies):
#   1. model "local" (or tokenizer_path ending in .gguf): llama.cpp's tokenizer
#      from the bundled SmolLM2 GGUF, loaded with vocab_only (no weights);
#   2. tokenizer_path: a Hugging Face tokenizer.json, run by `tokenizers`;
#   3. tiktoken, when it is installed and the model's encoding is already in its
#      local cache (it would otherwise try to download it);
#   4. an estimate of one token per 4 characters (details say "estimated").

# Known context windows by model-name prefix (longest prefix wins).
CONTEXT_WINDOWS = {
    "gpt-4o": 128_000, "gpt-4.1": 1_047_576, "gpt-4-turbo": 128_000, "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385, "o1": 200_000, "o3": 200_000, "o4": 200_000, "gpt-5": 400_000,
    "claude": 200_000, "llama-3": 8_192, "llama-3.1": 131_072, "mistral": 32_768,
    "qwen2": 32_768, "gemma": 8_192,
}  # fmt: skip
_CHUNK = re.compile(r"\s*\S+|\s+")
_TIKTOKEN_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


class _Estimate:
    name = "estimate (chars/4)"
    estimated = True
    context_window: int | None = None

    def overhead(self, role: str) -> int:
        return 4  # role and separators, as OpenAI counts chat messages

    def count_batch(self, texts: list[str]) -> list[int]:
        return [(len(t) + 3) // 4 for t in texts]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


class _LlamaTokens(_Estimate):
    """llama.cpp's tokenizer. For byte-level BPE vocabularies the text is cut
    where every pre-tokenizer cuts too (before whitespace that follows a
    non-space: no pre-token spans it), so counts per piece add up exactly and
    each distinct piece is tokenized once; that memo is what makes it fast."""

    estimated = False

    def __init__(self, path: Path) -> None:
        import llama_cpp

        with _quiet_stderr():  # llama.cpp logs a context-size warning in C
            self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = self.llm.metadata
        self.name = f"llama.cpp ({path.name})"
        arch = meta.get("general.architecture", "llama")
        ctx = meta.get(f"{arch}.context_length")
        self.context_window = int(ctx) if ctx else None
        self._bpe = meta.get("tokenizer.ggml.model") == "gpt2"
        self._chatml = "<|im_start|>" in meta.get("tokenizer.chat_template", "")
        self._vocab = self.llm._model.vocab
        self._buf = (llama_cpp.llama_token * 1)()
        self._blen: list[int] | None = None
        self._memo: dict[str, int] = {"": 0}
        self._memo_sp: dict[str, int] = {}
        self._over: dict[str, int] = {}

    def _tok(self, text: str, special: bool = False) -> int:
        import llama_cpp

        b = text.encode("utf-8", "replace")
        # A count needs no token list: with a too-small buffer llama_tokenize
        # returns minus the count (Llama.tokenize allocates n_ctx ints per call).
        n = llama_cpp.llama_tokenize(self._vocab, b, len(b), self._buf, 1, False, special)
        return abs(n)

    def overhead(self, role: str) -> int:
        n = self._over.get(role)
        if n is None:
            n = self._tok(f"<|im_start|>{role}\n<|im_end|>\n", True) if self._chatml else 4
            self._over[role] = n
        return n

    def count_batch(self, texts: list[str]) -> list[int]:
        if not self._bpe:
            return [self._tok(t) for t in texts]
        memo = self._memo
        if len(memo) > 2_000_000:
            memo.clear()
            memo[""] = 0
        # Text whose only whitespace is single spaces is cut with str.split (5×
        # faster than the regex): its pieces are the first word and " " + each
        # other word, counted from a memo keyed by the bare word.
        sp = self._memo_sp
        if len(sp) > 2_000_000:
            sp.clear()
        joined = " ".join(texts)
        if joined.isprintable() and "  " not in joined:
            return self._count_spaced(texts, joined)
        pieces: list[tuple[bool, list[str]]] = []
        unseen: set[str] = set()
        unseen_sp: set[str] = set()
        has, has_sp = memo.__contains__, sp.__contains__
        for t in texts:
            if t.isprintable() and "  " not in t:
                words = t.split(" ")
                pieces.append((True, words))
                if words[0] not in memo:
                    unseen.add(words[0])
                unseen_sp.update(itertools.filterfalse(has_sp, words[1:]))
            else:
                pcs = _CHUNK.findall(t)
                pieces.append((False, pcs))
                unseen.update(itertools.filterfalse(has, pcs))
        if unseen_sp:
            spaced = [" " + w for w in unseen_sp]
            self._learn(set(spaced) - memo.keys())
            for w, p in zip(unseen_sp, spaced, strict=True):
                sp[w] = memo[p]
        if unseen:
            self._learn(unseen)
        get, get_sp = memo.__getitem__, sp.__getitem__
        return [
            get(pcs[0]) + sum(map(get_sp, pcs[1:])) if split else sum(map(get, pcs))
            for split, pcs in pieces
        ]

    def _count_spaced(self, texts: list[str], joined: str) -> list[int]:
        """count_batch when every text has single spaces as its only
        whitespace: the words of all texts come from one split of the texts
        joined by a space; each text counts its first word bare and the
        others as " " + word."""
        memo, sp = self._memo, self._memo_sp
        words = joined.split(" ")
        lens = [t.count(" ") + 1 for t in texts]
        starts = [0, *itertools.accumulate(lens)]
        starts.pop()
        firsts = [words[k] for k in starts]
        counts = list(map(sp.get, words))
        if None in counts:
            unseen_sp = set(itertools.filterfalse(sp.__contains__, words))
            spaced = [" " + w for w in unseen_sp]
            self._learn(set(spaced) - memo.keys())
            for w, p in zip(unseen_sp, spaced, strict=True):
                sp[w] = memo[p]
            counts = list(map(sp.__getitem__, words))
        unseen = set(itertools.filterfalse(memo.__contains__, firsts))
        if unseen:
            self._learn(unseen)
        cum = [0, *itertools.accumulate(counts)]
        get, get_sp = memo.__getitem__, sp.__getitem__
        return [
            cum[s + n] - cum[s] - get_sp(f) + get(f)
            for s, n, f in zip(starts, lens, firsts, strict=True)
        ]

    def _learn(self, unseen: set[str]) -> None:
        """Count new pieces: those that start with whitespace back to back in
        one tokenizer call (each starts where a pre-token must start), cut
        apart by the byte length of each token; the rest one by one."""
        import llama_cpp

        memo = self._memo
        joinable = []
        for p in unseen:
            if p[0].isspace():
                joinable.append(p)
            else:
                memo[p] = self._tok(p)
        if not joinable:
            return
        if self._blen is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self._blen = [
                abs(llama_cpp.llama_token_to_piece(self._vocab, t, buf, 256, 0, False))
                for t in range(n)
            ]
        blen = self._blen
        for s in range(0, len(joinable), 2048):
            group = joinable[s : s + 2048]
            enc = [p.encode("utf-8", "replace") for p in group]
            data = b"".join(enc)
            out = (llama_cpp.llama_token * (len(data) + 8))()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), out, len(data) + 8, False, False
            )
            ends = list(itertools.accumulate(map(len, enc)))
            res = [-1] * len(group)
            k = pos = c = 0
            bad = False
            last = len(group)
            for tok in out[: max(n, 0)]:
                pos += blen[tok]
                c += 1
                while k < last and pos >= ends[k]:
                    res[k] = c if pos == ends[k] and not bad else -1
                    bad = pos > ends[k]
                    c = 0
                    k += 1
            for p, r in zip(group, res, strict=True):
                memo[p] = r if r >= 0 else self._tok(p)


class _HFTokens(_Estimate):
    estimated = False

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.name = f"tokenizers ({path.name})"

    def count_batch(self, texts: list[str]) -> list[int]:
        enc = self.tok.encode_batch(
            [t.encode("utf-8", "replace").decode() for t in texts], add_special_tokens=False
        )
        return [len(e.ids) for e in enc]


class _TiktokenTokens(_Estimate):
    estimated = False

    def __init__(self, enc: Any) -> None:
        self.enc = enc
        self.name = f"tiktoken ({enc.name})"

    def count_batch(self, texts: list[str]) -> list[int]:
        safe = [t.encode("utf-8", "replace").decode() for t in texts]
        return [len(x) for x in self.enc.encode_ordinary_batch(safe, num_threads=1)]


def _tiktoken_for(model: str | None) -> Any | None:
    """tiktoken's encoding for ``model`` when it needs no download, else None."""
    try:
        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    import tempfile

    try:
        name = encoding_name_for_model(model or "")
    except KeyError:
        name = "o200k_base"
    url = _TIKTOKEN_URLS.get(name)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if url is None or not (Path(cache) / hashlib.sha1(url.encode()).hexdigest()).is_file():
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:
        return None


def resolve_tokenizer(model: str | None = None, tokenizer_path: str | None = None) -> _Estimate:
    """The token counter for ``model``, in the order documented above."""
    if model == "local" or (tokenizer_path and tokenizer_path.endswith(".gguf")):
        if tokenizer_path and tokenizer_path.endswith(".gguf"):
            path: Path | None = Path(tokenizer_path)
        else:
            from keel.gateway.providers.local import bundled_model_paths

            path = bundled_model_paths()[0]
        try:
            if path is not None:
                return _LlamaTokens(path)
        except ImportError:
            pass
    if tokenizer_path:
        try:
            return _HFTokens(Path(tokenizer_path))
        except ImportError:
            pass
        except Exception as e:
            raise InvalidRequest(f"tokenizer {tokenizer_path}: cannot load it: {e}") from None
    enc = _tiktoken_for(model) if model != "local" else None
    return _TiktokenTokens(enc) if enc is not None else _Estimate()


def context_window(model: str | None) -> int | None:
    if not model:
        return None
    m = model.lower().split("/")[-1]
    best = max((p for p in CONTEXT_WINDOWS if m.startswith(p)), key=len, default=None)
    return CONTEXT_WINDOWS[best] if best else None
