"""Reading a request body with a size limit (gateway and OTLP ingest)."""

from __future__ import annotations

from starlette.requests import Request

from keel.errors import PayloadTooLarge


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) anything over ``max_bytes`` before reading it all.

    A declared Content-Length over the limit is refused at once; a chunked body
    is cut off as soon as it passes the limit.
    """
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > max_bytes:
        raise PayloadTooLarge(
            f"request body is {cl} bytes; the limit is {max_bytes} (gateway.max_body_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {max_bytes} bytes (gateway.max_body_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)
