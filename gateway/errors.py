"""OpenAI-style errors: every refusal the gateway makes looks like one the OpenAI API would make.

Clients (the official SDKs included) read `{"error": {"message", "type", "param", "code"}}` and the
HTTP status; keeping that shape means a client's own retry and error handling just works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from gateway.estimate import RequestFeatures

# The code of a request larger than any replica's context or KV cache (vLLM's and OpenAI's).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# The code of a request the gateway ends because it is shutting down.
SHUTTING_DOWN = "gateway_shutting_down"


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


def context_length_exceeded(req: RequestFeatures, pool: str, largest: float) -> GatewayError:
    """The request can never fit: vLLM's (and OpenAI's) answer to a context that is too long."""
    need = req.prompt_tokens + req.expected_output_tokens
    return GatewayError(
        400,
        f"This request needs about {need} tokens of KV cache ({req.prompt_tokens} in the prompt, "
        f"{req.expected_output_tokens} in the completion), more than the whole cache of any "
        f"replica of pool {pool!r} holds ({int(largest)} tokens). Please reduce the length of "
        "the messages or completion.",
        "invalid_request_error",
        None,
        CONTEXT_LENGTH_EXCEEDED,
    )


def upstream_timeout(limit_s: float) -> GatewayError:
    return GatewayError(
        504,
        f"The model server did not answer within {limit_s:g} s (gateway.first_byte_timeout_s). "
        "For long generations use stream=true, or ask the operator to raise the limit.",
        "upstream_error",
        None,
        "upstream_timeout",
    )


def shutting_down() -> GatewayError:
    return GatewayError(
        503,
        "The gateway is shutting down; please retry the request.",
        "server_error",
        None,
        SHUTTING_DOWN,
    )
