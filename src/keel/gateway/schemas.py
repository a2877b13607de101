"""OpenAPI documentation of the gateway's request bodies (``openapi_extra``).

The handlers parse the raw body themselves (see :mod:`keel.gateway.routes`); these
schemas only document it.
"""

from __future__ import annotations

JSON = "application/json"

CHAT_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
                    "additionalProperties": True,
                    "properties": {
                        "model": {
                            "type": "string",
                            "description": "A model alias (GET /v1/models).",
                        },
                        "messages": {"type": "array", "items": {"type": "object"}, "minItems": 1},
                        "stream": {"type": "boolean"},
                        "stream_options": {"type": "object"},
                        "user": {"type": "string"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            }
        },
    },
    "parameters": [
        {"name": "X-Keel-User", "in": "header", "required": False, "schema": {"type": "string"}},
        {"name": "X-Keel-Feature", "in": "header", "required": False, "schema": {"type": "string"}},
        {"name": "X-Keel-Session", "in": "header", "required": False, "schema": {"type": "string"}},
        {
            "name": "X-Keel-Tags",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "example": "team=search,env=prod"},
        },
    ],
}
EMBED_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["model", "input"],
                    "additionalProperties": True,
                    "properties": {
                        "model": {"type": "string"},
                        "input": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}},
                            ]
                        },
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    },
                }
            }
        },
    }
}
