"""What every request to `diffuse http` passes before any route sees it: the Host header (DNS
rebinding), the Origin (cross-site requests from other pages in the browser), credentials (any
bind other than loopback) and the body's size. A plain ASGI middleware: refusals are answered
here, in A1111's error shape, and the server goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A request body: an A1111 img2img carries its image as base64 in JSON; the daemon takes at most a
# 16 MiB request, whose base64 is 21.4 MiB. Anything larger could never become a job.
MAX_BODY_BYTES = 24 * 1024 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name of a Host header without its port: "[::1]:7860" → "::1", "a.b:80" → "a.b"."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0].lower()
    return host_header.rpartition(":")[0].lower() if host_header.count(":") == 1 else host_header.lower()


@dataclass
class Guard:
    """The settings the checks read: the bind address, extra Host names, origins allowed cross-site,
    and the credentials (a token, A1111-style user:pass pairs)."""

    bind: str
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    token: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    max_body: int = MAX_BODY_BYTES

    @property
    def needs_credentials(self) -> bool:
        return self.token is not None or bool(self.users)

    def host_allowed(self, host_header: str) -> bool:
        """Loopback names, the bind address, the configured names; with a wildcard bind any IP
        literal too (a rebinding attack needs a DNS name the attacker controls)."""
        name = host_name(host_header)
        if name in LOOPBACK_NAMES or name == self.bind.strip("[]").lower() or name in self.allowed_hosts:
            return True
        return self.bind in ("0.0.0.0", "::") and _is_ip(name)

    def origin_allowed(self, origin: str, host_header: str, scheme: str) -> bool:
        return origin in (f"{scheme}://{host_header}", *self.cors_origins)

    def authorised(self, authorization: str) -> bool:
        """A bearer token, or Basic credentials: a configured user, or any user with the token as
        password (so a browser's own login prompt works with the token)."""
        if not self.needs_credentials:
            return True
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and self.token is not None:
            return secrets.compare_digest(value.encode(), self.token.encode())
        if kind.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if self.token is not None and secrets.compare_digest(password.encode(), self.token.encode()):
            return True
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


def refusal_body(status: int, error: str, detail: str) -> bytes:
    """A1111's api_middleware error shape: error (the exception's name), detail, body, errors."""
    return json.dumps({"error": error, "detail": detail, "body": "", "errors": f"{status}: {detail}"}).encode()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then what the connection says next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class GuardMiddleware:
    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refused = self._check(scope, headers)
        if refused is not None:
            await self._refuse(send, *refused)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.guard.max_body):
            await self._refuse(send, 413, "RequestTooLarge",
                               f"the body is {length} bytes; this server takes at most {self.guard.max_body}")
            return
        if length is None and "chunked" in headers.get("transfer-encoding", ""):
            # No length to check up front: read the body here, within the bound, and hand it on whole
            # (the app's own body parsing would turn an exception raised mid-read into a 400).
            body = await self._read_bounded(receive)
            if body is None:
                await self._refuse(send, 413, "RequestTooLarge", f"the body is over {self.guard.max_body} bytes")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            size += len(message.get("body", b""))
            if size > self.guard.max_body:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    def _check(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str, dict[str, str]] | None:
        host = headers.get("host")
        if not host or not self.guard.host_allowed(host):
            return (421, "HostNotAllowed",
                    f"Host {host!r} is not this server's name (a DNS rebinding guard); allowed: "
                    f"{', '.join((*LOOPBACK_NAMES, self.guard.bind, *self.guard.allowed_hosts))} (--allow-host adds one)", {})
        origin = headers.get("origin")
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        if origin is not None and not self.guard.origin_allowed(origin, host, scheme):
            return 403, "OriginNotAllowed", f"cross-origin request from {origin} refused (--cors-origin allows one)", {}
        # A link followed from another site to the page is fine (a GET navigation changes nothing);
        # anything else a browser marks cross-site without an Origin is not.
        navigation = scope["method"] == "GET" and headers.get("sec-fetch-mode") == "navigate"
        if origin is None and headers.get("sec-fetch-site") == "cross-site" and not navigation:
            return 403, "OriginNotAllowed", "cross-site request refused (--cors-origin allows an origin)", {}
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if not preflight and not self.guard.authorised(headers.get("authorization", "")):
            return (401, "HTTPException", "credentials required: a bearer token, or user and password",
                    {"www-authenticate": 'Basic realm="diffusiond"'})
        return None

    @staticmethod
    async def _refuse(send: Send, status: int, error: str, detail: str, extra: dict[str, str] | None = None) -> None:
        body = refusal_body(status, error, detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
