"""The server's HTTP connections: uvicorn's h11 protocol with a header deadline and a connection cap.

uvicorn times out idle keep-alive connections but not a request whose headers never end: 300
such connections used to make every other client wait or get 503 (uvicorn's ``limit_concurrency``
counts them). Here a connection must deliver complete request headers within ``header_timeout``
seconds of opening (or of its previous response), else it is closed; and past ``max_connections``
open connections, a new one closes the oldest connection that is not running a request (itself
if every connection is busy), so idle sockets can never lock out a client with work to do.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from lfm2edge.runtime.core.errors import InvalidInputError


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class with these limits, for ``uvicorn.Config(http=...)``."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _idle_since = 0.0
        _waiting_cycle: object = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._expect_headers()
            if len(self.connections) > max_connections:
                self._evict()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            # Armed before uvicorn starts a pipelined request, which then counts as headers received.
            self._expect_headers()
            super().on_response_complete()

        def _idle(self) -> bool:
            """No request running: waiting for headers, or an idle keep-alive connection."""
            return self.cycle is None or self.cycle.response_complete

        def _expect_headers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._idle_since = self.loop.time()
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_overdue)

        def _headers_overdue(self) -> None:
            # A new request (new cycle) means its headers arrived in time.
            if self.cycle is self._waiting_cycle and self._idle() and not self.transport.is_closing():
                self.transport.close()

        def _evict(self) -> None:
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()
            ]
            victim = min(idle, key=lambda c: c._idle_since, default=self)
            if not victim.transport.is_closing():
                victim.transport.close()

    return GuardedH11Protocol


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or InvalidInputError saying why not."""
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port must be 0-65535, not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise InvalidInputError(f"cannot listen on {host}: {e}; pass an IP address or a local name") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise InvalidInputError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host"
        ) from None
    return sock


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's open-files limit towards ``wanted`` (within the hard limit); the limit now."""
    try:
        import resource
    except ImportError:  # not on Unix: nothing to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft
