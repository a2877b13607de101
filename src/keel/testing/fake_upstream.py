"""A fake LLM upstream: a real HTTP server speaking the OpenAI and Anthropic protocols.

Used by Keel's tests and benchmarks (and useful for yours): it answers
``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models`` the
way OpenAI does, and ``POST /v1/messages`` the way Anthropic does, streaming
included; and OpenAI's fine-tuning API (``POST /v1/files``, ``POST
/v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``). The reply echoes
the last user message.

Behaviour is controlled per request by directives, either in the model name
after a colon (``"fake:delay=200,error=500"``) or anywhere in the messages as
``[[fake: hang]]``:

=================  ============================================================
``delay=MS``       wait before answering (before the first chunk for streams)
``chunk_delay=MS`` wait between stream chunks
``error=STATUS``   answer with that HTTP status and an error body
``hang``           never answer (until the client gives up)
``malformed``      a body (or a stream chunk) that is not JSON
``no_usage``       omit token usage
``drop``           close the connection in the middle of a stream
``words=N``        reply with N words instead of the echo
``reply=B64``      reply with exactly this text (urlsafe base64, padding
                   optional); ``reply=B64.B64…`` replies with the Nth text when
                   the conversation already holds N assistant messages (the
                   last one after that), so a retry can get another answer
``ft_fail``        (fine-tuning: in the job's model or suffix, no colon needed)
                   the job goes queued → running → failed; otherwise it
                   succeeds on the third poll (``keel.testing._fake_finetune``)
=================  ============================================================

Run standalone: ``python -m keel.testing.fake_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keel.testing._fake_finetune import FineTuning

_DIRECTIVE = re.compile(r"\[\[fake:\s*([^\]]*)\]\]")


def _parse(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def directives(body: dict[str, Any]) -> dict[str, str]:
    d: dict[str, str] = {}
    model = str(body.get("model", ""))
    if ":" in model:
        d.update(_parse(model.split(":", 1)[1]))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            for spec in _DIRECTIVE.findall(_text_of(m.get("content"))):
                d.update(_parse(spec))
    return d


def _exact_reply(body: dict[str, Any], spec: str) -> str:
    texts = spec.split(".")
    turns = sum(
        1
        for m in body.get("messages") or []
        if isinstance(m, dict) and m.get("role") == "assistant"
    )
    enc = texts[min(turns, len(texts) - 1)]
    return base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)).decode()


def _reply_words(body: dict[str, Any], d: dict[str, str]) -> list[str]:
    if "reply" in d:
        # Split on single spaces so that " ".join (and the stream) give the text back exactly.
        return _exact_reply(body, d["reply"]).split(" ")
    if "words" in d:
        return [f"w{i}" for i in range(int(d["words"]))]
    last = ""
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            last = _DIRECTIVE.sub("", _text_of(m.get("content"))).strip()
    return ["Echo:", *last.split()] if last else ["Echo."]


def _prompt_tokens(body: dict[str, Any]) -> int:
    n = 0
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            n += len(_text_of(m.get("content")).split()) + 3
    if isinstance(body.get("system"), str):
        n += len(body["system"].split())
    return max(n, 1)


class FakeUpstream:
    """The server. ``requests`` keeps every JSON body received, for assertions."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, record: bool = True) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.record = record
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.fine_tuning = FineTuning()  # /v1/files, /v1/fine_tuning/jobs (see _fake_finetune)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                *self.fine_tuning.routes(),
            ]
        )

    @property
    def url(self) -> str:
        """Base URL for an OpenAI-compatible provider (ends with /v1)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> FakeUpstream:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        body = orjson.loads(raw) if raw else {}
        if self.record:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
        return body

    async def _pre(self, d: dict[str, str]) -> Response | None:
        if "hang" in d:
            await asyncio.sleep(3600)
        if "delay" in d:
            await asyncio.sleep(float(d["delay"]) / 1000)
        if "error" in d:
            status = int(d["error"])
            return JSONResponse(
                {
                    "error": {
                        "message": f"fake upstream error {status}",
                        "type": "fake_error",
                        "code": None,
                        "param": None,
                    }
                },
                status_code=status,
            )
        return None

    # -- OpenAI -------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake"}]}
        )

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        d = directives(body)
        if (early := await self._pre(d)) is not None:
            return early
        words = _reply_words(body, d)
        pt, ct = _prompt_tokens(body), len(words)
        model = str(body.get("model", "fake"))
        if not body.get("stream"):
            if "malformed" in d:
                return Response(b"this is not json {", media_type="application/json")
            out: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": " ".join(words)},
                    }
                ],
            }
            if "no_usage" not in d:
                out["usage"] = {
                    "prompt_tokens": pt,
                    "completion_tokens": ct,
                    "total_tokens": pt + ct,
                }
            return Response(orjson.dumps(out), media_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            self._openai_stream(model, words, pt, d, include_usage),
            media_type="text/event-stream",
        )

    async def _openai_stream(
        self, model: str, words: list[str], pt: int, d: dict[str, str], include_usage: bool
    ) -> AsyncIterator[bytes]:
        cd = float(d.get("chunk_delay", 0)) / 1000
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        first = {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
        yield b"data: " + orjson.dumps(first) + b"\n\n"
        for i, w in enumerate(words):
            if cd:
                await asyncio.sleep(cd)
            if "malformed" in d and i == len(words) // 2:
                yield b"data: {not json\n\n"
            if "drop" in d and i == len(words) // 2:
                raise ConnectionResetError("fake upstream dropped the connection")
            text = w if i == 0 else " " + w
            chunk = {
                **base,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + orjson.dumps(last) + b"\n\n"
        if include_usage and "no_usage" not in d:
            usage = {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": pt,
                    "completion_tokens": len(words),
                    "total_tokens": pt + len(words),
                },
            }
            yield b"data: " + orjson.dumps(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        d = directives(body)
        if (early := await self._pre(d)) is not None:
            return early
        inp = body.get("input")
        items = [inp] if isinstance(inp, str) else list(inp or [])
        data = []
        for i, text in enumerate(items):
            h = hashlib.sha256(str(text).encode()).digest()
            data.append(
                {"object": "embedding", "index": i, "embedding": [b / 255.0 for b in h[:8]]}
            )
        n = sum(len(str(t).split()) for t in items)
        out = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
        if "malformed" in d:
            return Response(b"[[[", media_type="application/json")
        return JSONResponse(out)

    # -- Anthropic ----------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        body = await self._body(request)
        d = directives(body)
        if "hang" in d:
            await asyncio.sleep(3600)
        if "delay" in d:
            await asyncio.sleep(float(d["delay"]) / 1000)
        if "error" in d:
            status = int(d["error"])
            return JSONResponse(
                {
                    "type": "error",
                    "error": {"type": "api_error", "message": f"fake anthropic error {status}"},
                },
                status_code=status,
            )
        if "max_tokens" not in body:
            return JSONResponse(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "message": "max_tokens: Field required",
                    },
                },
                status_code=400,
            )
        words = _reply_words(body, d)
        pt, ct = _prompt_tokens(body), len(words)
        usage = {
            "input_tokens": pt,
            "output_tokens": ct,
            "cache_read_input_tokens": int(d.get("cache_read", 0)),
            "cache_creation_input_tokens": int(d.get("cache_write", 0)),
        }
        model = str(body.get("model", "fake-claude"))
        if not body.get("stream"):
            if "malformed" in d:
                return Response(b"<html>oops</html>", media_type="application/json")
            return JSONResponse(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": " ".join(words)}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        return StreamingResponse(
            self._anthropic_stream(model, words, usage, d), media_type="text/event-stream"
        )

    async def _anthropic_stream(
        self, model: str, words: list[str], usage: dict[str, int], d: dict[str, str]
    ) -> AsyncIterator[bytes]:
        cd = float(d.get("chunk_delay", 0)) / 1000

        def ev(name: str, data: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        start_usage = {**usage, "output_tokens": 1}
        yield ev(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        )
        yield ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield ev("ping", {"type": "ping"})
        for i, w in enumerate(words):
            if cd:
                await asyncio.sleep(cd)
            if "malformed" in d and i == len(words) // 2:
                yield b"event: content_block_delta\ndata: {broken\n\n"
            if "drop" in d and i == len(words) // 2:
                raise ConnectionResetError("fake upstream dropped the connection")
            text = w if i == 0 else " " + w
            yield ev(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
        yield ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        yield ev("message_stop", {"type": "message_stop"})


def _free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main() -> None:  # pragma: no cover - exercised by the benchmarks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    fake = FakeUpstream(args.host, args.port, record=False)
    uvicorn.run(
        fake.app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":  # pragma: no cover
    main()
