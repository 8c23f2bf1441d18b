"""Optional API keys (``--api-key``, ``--api-key-file``; off when none is set): every request but
those to the open paths (probes and /metrics by default, ``--open-paths``) must send
``Authorization: Bearer <key>``, as the OpenAI clients do. A wrong, missing or malformed header all
get the same 401: the answer does not tell which part was wrong, and the key is compared with
every accepted key in constant time (``hmac.compare_digest``)."""

import hmac
from typing import Callable, Iterable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

UNAUTHORIZED = "a valid API key is required: send the header Authorization: Bearer <key>"


def key_matches(given: bytes, keys: Iterable[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, comparing with all of them (no early exit)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def bearer(scope: Scope) -> bytes:
    """The token of the request's ``Authorization: Bearer`` header (b"" if none)."""
    value = dict(scope.get("headers", ())).get(b"authorization", b"")
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class ApiKeys:
    """ASGI middleware: 401 (from ``refuse(path)``, the route's error shape) without a valid key."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str],
                 refuse: Callable[[str, str], Response]) -> None:
        self.app, self.keys, self.open_paths = app, tuple(k.encode() for k in keys), frozenset(open_paths)
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        if token and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        await self.refuse(scope["path"], UNAUTHORIZED)(scope, receive, send)
