"""Unit tests of the bounds of issue 10 (findings 7, 8) that need no container: the id's
encoded size, the event loop's cancellable timers, the metrics HTTP server (real
sockets, a real registry, in this process so that its threads can be counted)."""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmexec.protocol import codec, errors, messages
from warmexec.protocol.errors import WarmexecError
from warmexec.supervisor import httpserver, metrics
from warmexec.supervisor.loop import Loop

from ..conftest import wait_for

# ----------------------------------------------------------------------- the id's size

decodable = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(max_size=300) | st.text(min_size=30, max_size=300),
    lambda children: (st.lists(children, max_size=20)
                      | st.dictionaries(st.text(max_size=40), children, max_size=20)),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(decodable)
def test_encoded_size_is_exactly_what_msgpack_packs(value):
    assert codec.encoded_size(value, 1 << 30, 100) == len(codec.pack(value))


@pytest.mark.parametrize("n", [15, 16, 31, 32, 255, 256, 65535, 65536])
def test_encoded_size_of_every_header_length(n):
    for value in (b"x" * n, "x" * n, "\u2603" * n, [0] * n, {str(i): None for i in range(n)}):
        assert codec.encoded_size(value, 1 << 30, 2) == len(codec.pack(value))


def test_encoded_size_stops_at_the_limit_and_the_depth():
    assert codec.encoded_size(b"x" * 4093, 4096, 1) == 4096
    assert codec.encoded_size(b"x" * 4094, 4096, 1) is None
    assert codec.encoded_size("é" * 2047, 4096, 1) is None  # 4094 bytes of UTF-8, a 3-byte header
    assert codec.encoded_size([[1]], 100, 2) == 3 and codec.encoded_size([[[1]]], 100, 2) is None
    assert codec.encoded_size(list(range(10**6)), 4096, 1) is None  # stops early, whatever the length


def test_an_id_is_echoed_only_within_its_bounds():
    ok = {"v": 1, "op": "ping", "id": [1, {"k": b"x" * 4000}]}
    assert messages.check_envelope(ok) == (ok["id"], "ping") and messages.echoable_id(ok) is ok["id"]
    for bad in (b"x" * messages.MAX_ID, "x" * 5000, [[[[[[[[[1]]]]]]]]]):
        req = {"v": 1, "op": "ping", "id": bad}
        with pytest.raises(WarmexecError) as e:
            messages.check_envelope(req)
        assert e.value.code == errors.BAD_REQUEST and messages.echoable_id(req) is None
    # the id is checked before the version: even an UNSUPPORTED_VERSION reply echoes no huge id
    assert messages.echoable_id({"v": 2, "op": "ping", "id": b"x" * 5000}) is None


# ------------------------------------------------------------------------------ timers

def _fire_due(loop: Loop) -> None:
    loop.run_once(0)


def test_a_cancelled_timer_drops_its_callback_and_what_it_holds_at_once():
    class Finished:  # what a finished exec's timeout timer kept alive
        output = bytes(1 << 20)

    loop = Loop()
    held = Finished()
    ref = weakref.ref(held)
    timer = loop.call_at(time.monotonic() + 600, functools.partial(print, held))
    del held
    assert ref() is not None
    timer.cancel()
    assert ref() is None, "a cancelled timer still holds its callback's references"
    timer.cancel()  # idempotent


def test_cancelled_timers_never_fire_and_fired_ones_ignore_cancel():
    loop = Loop()
    fired = []
    now = time.monotonic()
    keep = loop.call_at(now - 1, lambda: fired.append("keep"))
    drop = loop.call_at(now - 2, lambda: fired.append("drop"))
    later = loop.call_at(now + 600, lambda: fired.append("later"))
    drop.cancel()
    _fire_due(loop)
    assert fired == ["keep"]
    keep.cancel()  # already fired: nothing to do, nothing counted
    assert loop._cancelled == 0
    later.cancel()
    _fire_due(loop)
    assert fired == ["keep"]


def test_the_heap_is_compacted_when_cancelled_entries_dominate():
    loop = Loop()
    now = time.monotonic()
    live = [loop.call_at(now + 600 + i, lambda: None) for i in range(10)]
    for i in range(20000):  # execs that finished long before their timeout
        loop.call_at(now + 600 + i, lambda: None).cancel()
        assert len(loop.timers) <= 2 * len(live) + 2 * Loop.COMPACT_MIN + 2
    gc.collect()
    assert all(t.fn is not None for t in live)
    assert sum(1 for entry in loop.timers if entry[2].fn is not None) == 10


def test_timers_fire_in_order_across_compactions():
    loop = Loop()
    fired: list[int] = []
    now = time.monotonic()
    for i in range(2000):
        timer = loop.call_at(now - 10 + i / 1000, lambda i=i: fired.append(i))
        if i % 3:
            timer.cancel()
    _fire_due(loop)
    assert fired == list(range(0, 2000, 3))


# ------------------------------------------------------------------ metrics over HTTP

@pytest.fixture
def server():
    srv = httpserver.start_http_server(0, "127.0.0.1", metrics.Metrics().registry)
    yield srv
    srv.close()


def _scrape(port: int, timeout: float = 1.0, **headers: str) -> urllib.request.addinfourl:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    return urllib.request.urlopen(req, timeout=timeout)


def _closed(conn: socket.socket) -> bool:
    """The server closed conn (an EOF or a reset), without waiting."""
    conn.setblocking(False)
    try:
        return conn.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_pin_no_thread_and_a_scrape_still_answers_within_a_second(server):
    threads0 = threading.active_count()
    conns = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        for i, conn in enumerate(conns):
            if i % 2:
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request head
        t0 = time.monotonic()
        body = _scrape(server.port).read()
        took = time.monotonic() - t0
        assert b"warmexec_containers" in body and took < 1, f"a scrape took {took:.2f}s"
        assert threading.active_count() <= threads0, "idle connections took threads"
        assert len(server.live) <= httpserver.MAX_CONNECTIONS
        # The oldest were closed as new ones came; the rest go at their request timeout.
        wait_for(lambda: all(_closed(c) for c in conns), httpserver.REQUEST_TIMEOUT + 2,
                 "every idle connection to be closed")
    finally:
        for conn in conns:
            conn.close()


def test_a_request_dripped_byte_by_byte_or_too_large_is_cut_off(server):
    drip = socket.create_connection(("127.0.0.1", server.port))
    huge = socket.create_connection(("127.0.0.1", server.port))
    try:
        huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * httpserver.MAX_REQUEST_HEAD + b"\r\n")
        wait_for(lambda: _closed(huge), 2, "a request head over the limit to be refused")
        t0 = time.monotonic()
        head = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100
        for i in range(len(head)):  # one byte every 20 ms: about 14 s in all
            try:
                drip.sendall(head[i:i + 1])
            except OSError:
                break
            if _closed(drip):
                break
            time.sleep(0.02)  # the client's pace, not a synchronisation
        took = time.monotonic() - t0
        assert _closed(drip) or took < httpserver.REQUEST_TIMEOUT + 1
        assert took < httpserver.REQUEST_TIMEOUT + 1, f"a dripping client was served for {took:.1f}s"
    finally:
        drip.close()
        huge.close()


def test_the_scrape_is_what_prometheus_client_serves(server):
    r = _scrape(server.port, Accept="application/openmetrics-text; version=1.0.0",
                **{"Accept-Encoding": "gzip"})
    assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.headers["Content-Encoding"] == "gzip"
    plain = _scrape(server.port)
    assert plain.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE warmexec_exec_errors_total counter" in plain.read()
    url = f"http://127.0.0.1:{server.port}/?name[]=warmexec_exec_errors_total"
    assert urllib.request.urlopen(url, timeout=1).read().decode().count("# TYPE") == 1


def test_probes_waiting_for_their_answer_leave_room_for_the_scrape():
    """At most MAX_ROUTED routed requests wait at once: the next is 503 at once, and the
    scrape still answers; the waiting ones are answered when their route returns."""
    gate = asyncio.Event()

    async def slow(_request: httpserver.Request) -> httpserver.Response:
        await gate.wait()
        return httpserver.text("200 OK", "done\n")

    srv = httpserver.start_http_server(0, "127.0.0.1", metrics.Metrics().registry, routes={"/probe": slow})
    conns = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(httpserver.MAX_ROUTED)]
    try:
        for conn in conns:
            conn.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: srv.routed == httpserver.MAX_ROUTED, 5, "every probe to wait")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/probe", timeout=1)
        assert e.value.code == 503
        assert b"warmexec_containers" in _scrape(srv.port).read()
        srv.loop.call_soon_threadsafe(gate.set)
        for conn in conns:
            conn.settimeout(5)
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"done\n")
        assert srv.routed == 0
    finally:
        for conn in conns:
            conn.close()
        srv.close()
