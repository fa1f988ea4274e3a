"""The uvicorn server under `nmt serve`: where it listens, how many connections it holds, how it stops.

Connections are bounded with uvicorn's own options: `limit_concurrency` (the cap: requests
beyond it get 503), `timeout_keep_alive` (idle connections closed), `h11_max_incomplete_event_size`
(request headers of at most 16 KiB), `backlog` and `timeout_graceful_shutdown`. Two limits
uvicorn lacks are added to its HTTP/1.1 protocol in `Connection`: a connection beyond the cap
is closed as soon as it is accepted, and the idle timer also runs before a request's headers
are complete, so silent or slow sockets are closed too. The cap fits the descriptor limit, so
the process never runs out of descriptors (whose accept errors once flooded the log).
"""

from __future__ import annotations

import asyncio
import math
import resource
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nmt.errors import NmtError
from nmt.serve.app import create_app
from nmt.serve.keys import ApiKeys
from nmt.serve.listen import Listen
from nmt.serve.service import Service

RESERVED_DESCRIPTORS = 64  # model files, pipes, threads: what the process needs besides its connections
MAX_HEADER_BYTES = 16 * 1024


def connection_cap(wanted: int) -> int:
    """At most `wanted` connections, and few enough that accepting one never fails for lack of descriptors.

    Each connection holds a descriptor, and asyncio accepts up to `backlog` (set to the cap) at a time
    before the ones beyond the cap are closed: the cap, two such batches and `RESERVED_DESCRIPTORS` must
    fit the soft limit, which is raised toward the hard one where that is needed and allowed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * wanted + RESERVED_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - RESERVED_DESCRIPTORS) // 3))


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed at once beyond the cap, and timed from its start.

    uvicorn starts its keep-alive timer only after a response and stops it at the first byte
    received; here it runs from the connection's start until a request's headers are complete
    (uvicorn stops it there), so a client that sends nothing, or headers a byte at a time, is
    closed after `timeout_keep_alive` seconds.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)  # uvicorn's own stops the timer here, before the headers are in
        self.handle_events()


class GracefulServer(uvicorn.Server):
    """uvicorn, announcing its address (port 0 picks a free one) and draining the service on shutdown."""

    def __init__(self, config: uvicorn.Config, service: Service, listen: Listen, warnings: list[str]) -> None:
        super().__init__(config)
        self.service, self.grace, self.warnings = service, listen.grace, warnings

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"nmt serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
            for warning in self.warnings:
                print(f"nmt serve: warning: {warning}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        """No new connections; queued requests finish; past `grace` seconds the rest get 503, never half a response."""
        self.service.drain()
        deadline = asyncio.get_running_loop().call_later(self.grace, self.service.abandon)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def serve(service: Service, listen: Listen, device: str, precision: str, keys: ApiKeys | None = None,
          cors_origins: Sequence[str] = ()) -> None:
    """Listen until SIGTERM/SIGINT, loading the models meanwhile; a failed load stops the server."""
    app = create_app(service, keys, cors_origins)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        def loaded(failure: BaseException | None) -> None:
            if failure is not None:  # the command reports it once the server has stopped
                server.should_exit = True
                return
            engines = "; ".join(f"{pair} in {model.engine.precision.describe()}"
                                for pair, model in service.models.items() if model.engine is not None)
            print(f"nmt serve: ready: {engines}", file=sys.stderr, flush=True)

        service.load(device, precision, loaded)
        yield  # shutting down: the batch running now ends before the process does (torch aborts otherwise)
        await asyncio.to_thread(service.join, listen.grace + service.limits.timeout)

    app.router.lifespan_context = lifespan
    cap = connection_cap(listen.max_connections)
    config = uvicorn.Config(app, host=listen.host, port=listen.port, log_level="warning", access_log=False,
                            http=Connection, limit_concurrency=cap, backlog=cap,
                            timeout_keep_alive=listen.idle_timeout,  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=math.ceil(listen.grace) + 5, lifespan="on")
    server = GracefulServer(config, service, listen, warnings(listen, keys, cap))
    server.run(sockets=[bind(listen.host, listen.port, cap)])


def warnings(listen: Listen, keys: ApiKeys | None, cap: int) -> list[str]:
    """What the operator should know at start: an open server, fewer connections than asked."""
    found = []
    if keys is None and listen.exposed():
        found.append(f"listening on {listen.host} without --api-keys: anyone who can reach this port can "
                     f"translate with it")
    if cap < listen.max_connections:
        found.append(f"at most {cap} connections, not --max-connections {listen.max_connections}: the "
                     f"descriptor limit (ulimit -n) is too low")
    return found


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Listen before anything loads, so that a taken port or an unknown host is a one-line error.

    The socket is made with `IPPROTO_TCP` named: asyncio sets TCP_NODELAY only on connections
    whose protocol says TCP, and `socket.create_server` leaves it 0. Without TCP_NODELAY every
    response on a kept-alive connection waited ~40 ms for the client's delayed ACK (measured:
    /health 44 ms, a 34 ms translation 88 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except (OSError, OverflowError) as exc:
        listener.close()
        raise NmtError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return listener
