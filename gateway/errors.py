"""OpenAI-style errors: every refusal the gateway makes looks like one the OpenAI API would make.

Clients (the official SDKs included) read `{"error": {"message", "type", "param", "code"}}` and the
HTTP status; keeping that shape means a client's own retry and error handling just works.
"""

from __future__ import annotations

import orjson
from aiohttp import web

# The code of a request larger than any replica's context or KV cache (vLLM's and OpenAI's).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class GatewayError(Exception):
    """A request the gateway refuses, with the status and OpenAI error fields to answer with."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, request_id: str | None = None) -> web.Response:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_error_event(
    message: str, type_: str = "upstream_error", code: str = "upstream_failed"
) -> bytes:
    """A well-formed end to a stream that broke after its first byte (vLLM sends the same shape)."""
    payload = orjson.dumps(error_body(message, type_, None, code))
    return b"data: " + payload + b"\n\ndata: [DONE]\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", param, code)


def unknown_model(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or is not served by this gateway.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Incorrect or missing API key. Pass it as `Authorization: Bearer <key>`.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    )


def overloaded(message: str, retry_after_s: float, code: str = "queue_full") -> GatewayError:
    return GatewayError(
        429,
        message,
        "rate_limit_error",
        None,
        code,
        {"Retry-After": str(max(1, int(round(retry_after_s))))},
    )


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, "upstream_error", None, "upstream_failed")
