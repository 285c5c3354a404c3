"""The request body: parsed once (orjson) and type-checked only in the fields the gateway reads.

The model server checks the rest; what the gateway refuses here it refuses the way the OpenAI API
would (gateway/errors.py), before any replica is asked.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway import errors


def parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    """Parse and type-check the fields the gateway reads; the model server checks the rest."""
    if not raw:
        raise errors.bad_request("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise errors.bad_request(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise errors.bad_request(
            "You must provide a model parameter.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise errors.bad_request("`model` must be a non-empty string.", "model", "invalid_type")
    if endpoint == "chat/completions":
        msgs = body.get("messages")
        if msgs is None:
            raise errors.bad_request(
                "You must provide a messages parameter.", "messages", "missing_required_parameter"
            )
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise errors.bad_request(
                "`messages` must be a non-empty array of message objects.",
                "messages",
                "invalid_type",
            )
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise errors.bad_request(
                "You must provide a prompt parameter.", "prompt", "missing_required_parameter"
            )
        if not _valid_prompt(prompt):
            raise errors.bad_request(
                "`prompt` must be a string, an array of strings, or token ids.",
                "prompt",
                "invalid_type",
            )
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise errors.bad_request("`stream` must be a boolean.", "stream", "invalid_type")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise errors.bad_request(f"`{key}` must be a positive integer.", key, "invalid_type")
    return body


def _valid_prompt(p: Any) -> bool:
    if isinstance(p, str):
        return True
    if isinstance(p, list) and p:
        return (
            all(isinstance(x, str) for x in p)
            or all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            or all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in p)
        )
    return False
