"""The metrics HTTP server: one thread, one asyncio loop, bounded everywhere.

It serves the scrape (any path but the routed ones and ``/favicon.ico``, as
prometheus_client's own server answers) and the routes it is given: ``/probe`` and
``/sd`` (exporter.py), coroutines that may wait for the supervisor's loop.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger("warmexec")

MAX_CONNECTIONS = 32  # open at once; past it the oldest still sending its request goes
MAX_ROUTED = 16  # routed requests (probes) being answered at once; past it 503
REQUEST_TIMEOUT = 5.0  # seconds to send the request line and headers
WRITE_TIMEOUT = 10.0  # seconds to take the response
MAX_REQUEST_HEAD = 8192  # bytes of request line and headers


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case


Response = tuple[str, list[tuple[str, str]], bytes]  # status line, headers, body
Route = Callable[[Request], Awaitable[Response]]


def parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    url = urlsplit(rest.rpartition(" ")[0] or rest)
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Request(method, url.path, parse_qs(url.query), fields)


class MetricsServer:
    """The metrics endpoint: one thread running one asyncio loop, bounded everywhere.

    prometheus_client's own server starts a thread per connection and reads without a
    timeout: a local user opening connections that never send a byte pinned one thread
    each, without limit. Here a connection is a coroutine on one thread. It has
    REQUEST_TIMEOUT to send a request head of at most MAX_REQUEST_HEAD bytes and
    WRITE_TIMEOUT to take its response, one response per connection. At most
    MAX_CONNECTIONS are open: a new one past that closes the oldest connection still
    waiting for its request (itself, if it is the only one), so idle or slow clients can
    neither lock a scraper out for long nor pin more than MAX_CONNECTIONS head buffers
    and responses. A routed request (a probe) may wait for its answer as long as its
    route allows; at most MAX_ROUTED wait at once (past it: 503), so probes leave room
    for the scrape.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 routes: Mapping[str, Route] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.routes = dict(routes or {})
        self.on_close = on_close  # run on this thread's loop before it stops
        self.routed = 0
        self.loop = asyncio.new_event_loop()
        # Open connections, oldest first -> True while it has not sent its request.
        self.live: dict[asyncio.StreamWriter, bool] = {}
        self.server = self.loop.run_until_complete(  # a bind error is raised here, at once
            asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, name="warmexec-metrics",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving, end every connection, stop the thread."""
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.on_close is not None:
            self.on_close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if writer in self.live:
                self.live[writer] = False
            request = parse_head(head)
            route = self.routes.get(request.path) if request.method == "GET" else None
            response = self.respond(request) if route is None else await self._routed(route, request)
            writer.transport.set_write_buffer_limits(0)  # drain() returns once all is sent
            writer.write(http_bytes(*response))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:
            log.exception("internal error serving metrics")
        finally:
            self.live.pop(writer, None)
            writer.transport.abort()  # sent, or not taken in time: nothing is left to wait for

    async def _routed(self, route: Route, request: Request) -> Response:
        if self.routed >= MAX_ROUTED:
            return text("503 Service Unavailable", f"{MAX_ROUTED} probes are being answered; retry\n")
        self.routed += 1
        try:
            return await route(request)
        finally:
            self.routed -= 1

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Past MAX_CONNECTIONS, close the oldest connection yet to send its request."""
        self.live[writer] = True
        if len(self.live) > MAX_CONNECTIONS:
            victim = next(w for w, waiting in self.live.items() if waiting)  # writer, at worst
            del self.live[victim]
            victim.transport.abort()  # its coroutine ends on the reset

    def respond(self, request: Request) -> Response:
        """The scrape, as prometheus_client's own server answers it: any path but
        /favicon.ico (and the routes) is the scrape."""
        if request.method == "OPTIONS":
            return "200 OK", [("Allow", "OPTIONS,GET")], b""
        if request.method != "GET":
            return ("405 Method Not Allowed", [("Allow", "OPTIONS,GET")],
                    f"# HTTP 405 Method Not Allowed: {request.method[:32]}; use OPTIONS or GET\n".encode())
        if request.path == "/favicon.ico":
            return "200 OK", [], b""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = self.registry
        names = request.query.get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        body, headers = encoder(registry), [("Content-Type", content_type)]
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return "200 OK", headers, body


def text(status: str, body: str) -> Response:
    return status, [("Content-Type", "text/plain; charset=utf-8")], body.encode()


def http_bytes(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def start_http_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY,
                      routes: Mapping[str, Route] | None = None,
                      on_close: Callable[[], None] | None = None) -> MetricsServer:
    """prometheus_client.start_http_server's signature (plus routes), served by MetricsServer."""
    return MetricsServer(registry, addr, port, routes, on_close)
