"""Which headers cross the gateway: the client's to the replica, the replica's back.

Hop-by-hop headers (RFC 9110 7.6.1), those a Connection header names, and those aiohttp sets for
its own connections are dropped both ways, in one pass each; the gateway's own `x-request-id` is
added. The gateway's API key (`Authorization`) is for the gateway, not the model server.
"""

from __future__ import annotations

import aiohttp
from multidict import MultiMapping

# RFC 9110 7.6.1 hop-by-hop headers (and those the Connection header names, see _dropped), plus
# those aiohttp sets itself for the new connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Expect: 100-continue was answered here, and the gateway holds the whole body before it picks:
# passed on, the replica would round-trip a 100 Continue before the body could follow.
_DROP_UP = HOP_BY_HOP | {"x-request-id", "expect"}
_DROP_UP_AUTH = _DROP_UP | {"authorization"}  # the key was for the gateway, not the model server
_DROP_DOWN = HOP_BY_HOP | {"x-request-id", "date", "server"}  # aiohttp sets date and server
# Connection header values that name no header beyond the fixed hop-by-hop ones (the usual ones)
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "upgrade"})


def _dropped(h: MultiMapping[str], drop: frozenset[str]) -> frozenset[str]:
    """`drop` plus the headers `h`'s Connection headers name: hop-by-hop too (RFC 9110 7.6.1)."""
    connection = ",".join(h.getall("Connection", ()))  # every Connection header names some
    if not connection or connection.lower() in _PLAIN_CONNECTION:
        return drop
    named = {t.strip().lower() for t in connection.split(",")}
    return drop if named <= drop else drop | named


def upstream_headers(h: MultiMapping[str], rid: str, *, strip_auth: bool) -> list[tuple[str, str]]:
    """The client's headers for the replica: hop-by-hop ones, the gateway's key and its
    x-request-id left out, ours added."""
    drop = _dropped(h, _DROP_UP_AUTH if strip_auth else _DROP_UP)
    out = [(k, v) for k, v in h.items() if k.lower() not in drop]
    out.append(("x-request-id", rid))
    return out


def downstream_headers(resp: aiohttp.ClientResponse, rid: str) -> dict[str, str]:
    drop = _dropped(resp.headers, _DROP_DOWN)
    out = {k: v for k, v in resp.headers.items() if k.lower() not in drop}
    out["x-request-id"] = rid
    return out
