"""How the server listens: the guard in front of the routes, uvicorn with a connection cap and
timeouts, binding before saying where, and what binding beyond loopback means.

`Guard` (ASGI middleware) checks the Host header (DNS rebinding), the API key and the content type before
a route runs and writes one log line per request. `Protocol` is uvicorn's h11 protocol with a deadline for
each request's headers and a cap on open connections.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Optional

import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api import MAX_BODY_BYTES, ApiError
from .config import IlladaError

log = logging.getLogger("illada_mlx.server")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class Options:
    """The server's limits and exposure settings (cli `serve` options)."""

    max_body: int = MAX_BODY_BYTES
    max_prompt_chars: Optional[int] = None  # None: 16 characters per position of the model
    body_seconds: float = 30.0  # to read a request's body
    api_key: Optional[str] = None
    allowed_hosts: Optional[tuple] = None  # None or ("*",): any Host header (exposure() fills in None)
    allowed_origins: tuple = ()  # CORS; empty: off


def _host_name(host: str) -> Optional[str]:
    """The Host header without its port; None when the port is not a number in 1..65535 (`localhost:abc`)."""
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end > 0 else (host, "")
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:
        name, port = host, None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    return name


def check_api_key(key: Optional[str], where: str = "--api-key") -> Optional[str]:
    """A key a client can send in an Authorization header: printable ASCII without spaces. An empty one
    (which would start an open server without a word) and one no client can send are refused at start."""
    if key is None:
        return None
    if not key:
        raise IlladaError(f"{where} is empty, which would leave the server open; give a key, or leave it unset")
    bad = next((c for c in key if not 33 <= ord(c) <= 126), None)
    if bad is not None:
        raise IlladaError(
            f"{where} holds {bad!r}, which no client can send in an Authorization header; use "
            "printable ASCII without spaces (letters, digits, punctuation)"
        )
    return key


def host_names(value: Optional[str]) -> Optional[tuple]:
    """--allowed-hosts as a tuple of lower-case names: None (the bound host's names) when not given, ("*",)
    for any Host; a list that names no host (`,,,`) is refused."""
    if value is None:
        return None
    names = tuple(x.strip().lower() for x in value.split(",") if x.strip())
    if not names:
        raise IlladaError(f"--allowed-hosts {value!r} names no host; give a comma list of names, or '*' for any")
    return ("*",) if "*" in names else names


def public(scope) -> bool:
    """Paths served without the API key: /health and the web chat page's files and icon (the page asks for the key
    and sends it with its API calls)."""
    path, reading = scope["path"], scope["method"] in ("GET", "HEAD")
    return path == "/health" or (reading and (path in ("/", "/favicon.ico") or path.startswith("/static/")))


class Guard:
    """Before any route: the Host header (DNS rebinding), the API key (Bearer; not for `public` paths),
    application/json on POST.
    After: one log line per request (method, path, status, prompt/output tokens, ms); a client that went
    away is one line too."""

    def __init__(self, app, opts: Options):
        self.app, self.opts = app, opts

    def _refuse(self, scope) -> Optional[ApiError]:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", ""))
        if host is None:
            return ApiError(400, "the Host header's port is not a number in 1..65535", code="invalid_host")
        host = host.lower()
        allowed = self.opts.allowed_hosts
        if allowed is not None and "*" not in allowed and host not in allowed:
            return ApiError(
                400,
                f"Host {host!r} is not served here; start the server with --allowed-hosts to allow it",
                code="invalid_host",
            )
        key = self.opts.api_key
        if key and not public(scope) and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return ApiError(
                    401,
                    "missing or wrong API key: send Authorization: Bearer <key>",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return ApiError(
                    415, "the body must be sent as Content-Type: application/json", code="unsupported_media_type"
                )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, reason = time.perf_counter(), [0], [""]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] >= 400 and not reason[0]:
                reason[0] = _reason(message.get("body", b""))
            await send(message)

        refused = self._refuse(scope)
        try:
            if refused is not None:
                await refused.response()(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except (ClientDisconnect, ConnectionError) as e:
            log.info("%s %s: client disconnected (%s)", scope["method"], scope["path"], type(e).__name__)
        if scope.get(MALFORMED):
            reason[0] = "malformed HTTP body (bad chunked encoding); answered 400 and closed"
        tokens = scope.get("state", {}).get("tokens")
        log.info(
            "%s %s %s%s %.0f ms%s",
            scope["method"],
            scope["path"],
            status[0] or "-",
            f" prompt={tokens[0]} output={tokens[1]}" if tokens else "",
            1000 * (time.perf_counter() - t0),
            f": {reason[0]}" if reason[0] else "",
        )


def _reason(body: bytes) -> str:
    """An error response's message (OpenAI's shape), for the log line; "" when the body is not one."""
    try:
        err = json.loads(body[:4096])["error"]
        return f"{err['message']}" + (f" ({err['param']})" if err.get("param") else "")
    except (ValueError, KeyError, TypeError):
        return ""


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (an idle or slow connection is
    closed) and a cap on open connections (over it, the oldest connection without a request in flight is
    closed to make room)."""

    header_seconds = 10.0
    max_connections = 256

    def connection_made(self, transport):
        super().connection_made(transport)
        self.logger = _ConnectionLog(self.logger, self)
        self.opened = self.loop.time()
        self._waiting_for = None
        self._arm()
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) > self.max_connections:
            idle = [
                c
                for c in open_
                if getattr(c, "opened", None) is not None and (c.cycle is None or c.cycle.response_complete)
            ]
            oldest = min(idle, key=lambda c: c.opened, default=self)
            oldest.transport.close()

    def _arm(self):
        self._deadline = self.loop.call_later(self.header_seconds, self._too_slow)
        self._waiting_for = self.cycle

    def _too_slow(self):
        if self.cycle is self._waiting_for and not self.transport.is_closing():
            self.transport.close()  # no request headers in time

    def handle_events(self):
        super().handle_events()
        if self.cycle is not self._waiting_for and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            if self._deadline is not None:
                self._deadline.cancel()
            self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


MALFORMED = "illada.malformed"  # set in a request's scope when its body broke HTTP framing


class _ConnectionLog:
    """uvicorn's logger for one connection, less its warning about a malformed request while the app reads
    that request's body (a bad chunk): the request's own log line says it, so it is one line, not two."""

    def __init__(self, logger, conn):
        self._logger, self._conn = logger, conn

    def warning(self, msg, *args, **kw):
        cycle = self._conn.cycle
        if str(msg).startswith("Invalid HTTP request") and cycle is not None and not cycle.response_complete:
            cycle.scope[MALFORMED] = True
            return
        self._logger.warning(msg, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._logger, name)


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft limit on open files toward what a burst of connections needs (a burst is accepted
    before the connection cap closes the surplus: about 8 fds per allowed connection), within the hard
    limit; returns the soft limit now. macOS starts processes at 256."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 8 * max_connections + 1024)
    want = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


class LoopErrors:
    """The event loop's exception handler: running out of file descriptors while accepting (a burst of
    connections) is one warning per burst (no traceback per refused accept); anything else goes to the
    default handler."""

    def __init__(self, quiet_seconds: float = 10.0):
        self.quiet_seconds, self.last, self.count = quiet_seconds, float("-inf"), 0

    def __call__(self, loop, context):
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        self.count += 1
        if now - self.last > self.quiet_seconds:
            err = context.get("exception")
            log.warning(
                "a burst of connections reached the open-file limit (%s): new connections wait until "
                "some close (this line repeats at most every %.0f s)",
                getattr(err, "strerror", err),
                self.quiet_seconds,
            )
        self.last = now


def make_server(
    app,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    max_connections: int = 256,
    idle_seconds: float = 10.0,
) -> uvicorn.Server:
    """A uvicorn server with the connection cap, keep-alive and header timeouts set."""
    proto = type("Protocol", (Protocol,), {"header_seconds": idle_seconds, "max_connections": max_connections})
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            http=proto,
            log_level=log_level,
            access_log=False,
            limit_concurrency=2 * max_connections,
            timeout_keep_alive=int(idle_seconds) or 1,
            timeout_graceful_shutdown=5,
        )
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise IlladaError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host")
    return sock


def exposure(host: str, opts: Options) -> list[str]:
    """Fill in the Host names accepted for a bound host (loopback: the localhost names; a named address:
    itself; all interfaces: any, unless --allowed-hosts) and return the warnings to print."""
    loopback = host in LOOPBACK
    if opts.allowed_hosts is None and loopback:
        opts.allowed_hosts = tuple(sorted(set(LOOPBACK)))
    elif opts.allowed_hosts is None and host not in ("0.0.0.0", "::", ""):
        opts.allowed_hosts = (host.lower(),)
    if not loopback and not opts.api_key:
        return [
            f"warning: listening on {host}, beyond this machine, without an API key: anyone who can reach "
            "it can use it (set --api-key or ILLADA_MLX_API_KEY)"
        ]
    return []
