"""What a client controls, bounded: echoed ids, unread replies, finished execs' timers,
the metrics endpoint, requests over the frame limit (issue 10, findings 7 and 8).

Memory is measured as RSS growth of a fresh supervisor (the session's has freed memory
of earlier tests to reuse, which would hide growth).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import zmq

from warmexec.protocol import Client, codec, errors, messages
from warmexec.protocol.errors import WarmexecError

from .conftest import Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root

MIB = 1 << 20


def _scrape(sup: Supervisor, timeout: float = 5) -> str:
    url = f"http://127.0.0.1:{sup.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, 0 if absent (labels in any order)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
    return 0.0


def _errors(sup: Supervisor, code: str) -> float:
    return _metric(_scrape(sup), "warmexec_exec_errors_total", code=code)


def _stalled_dealer(endpoint: str) -> zmq.Socket:
    """A client that never reads: its own queue holds one message, its socket 4 KiB."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(endpoint)
    return s


def _rss(sup: Supervisor) -> int:
    return psutil.Process(sup.proc.pid).memory_info().rss


# ------------------------------------------------------------------------ request ids

def test_an_id_too_large_to_echo_is_refused_with_a_nil_id(supervisor):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(supervisor.endpoint)
    at_limit = b"x" * (messages.MAX_ID - 3)  # a bin16 header: MAX_ID bytes encoded
    try:
        for req_id in (at_limit, at_limit + b"x", b"x" * (4 * MIB - 100), [[[[[[[[[1]]]]]]]]]):
            s.send(codec.pack({"v": 1, "id": req_id, "op": "ping"}))
            assert s.poll(5000), "no reply"
            data = s.recv()
            reply = codec.unpack_map(data)
            if req_id is at_limit:
                assert reply["ok"] and reply["id"] == at_limit
                continue
            assert (reply["ok"], reply["id"] is None) == (False, True), "a refused id was echoed"
            assert reply["error"]["code"] == errors.BAD_REQUEST
            assert len(data) < 1024, f"a refused id cost a reply of {len(data)} bytes"
    finally:
        s.close()


def test_pings_with_huge_ids_into_a_client_that_never_reads_cost_no_memory(box, tmp_path):
    """Up to this fix each 4 MiB id was echoed into that client's queue: +260 MiB here."""
    sup = Supervisor(box, str(tmp_path))
    s = _stalled_dealer(sup.endpoint)
    try:
        def handled() -> float:  # requests the supervisor has read and answered
            return _metric(_scrape(sup), "warmexec_request_size_bytes_count")
        base = handled()
        rss0 = _rss(sup)
        big = os.urandom(4 * MIB - 100)
        for _ in range(64):
            s.send(codec.pack({"v": 1, "id": big, "op": "ping"}))
        wait_for(lambda: handled() >= base + 64, 60, "the 64 pings to be answered")
        grown = _rss(sup) - rss0
    finally:
        s.close()
        assert sup.stop() == 0
    print(f"\n64 unread pings with 4 MiB ids: supervisor RSS +{grown / MIB:.1f} MiB")
    assert grown < 16 * MIB, f"64 unread pings held {grown / MIB:.0f} MiB in the supervisor"


# --------------------------------------------------------------------- unread replies

def test_a_stalled_client_is_bounded_in_bytes_and_a_reading_one_gets_every_reply(box, container, tmp_path):
    """Unread large replies stop at the stalled client's byte budget; another client that
    pipelines as many and reads them only late (its zmq I/O thread drains meanwhile) is
    not touched by that budget, nor by its own: every reply arrives."""
    sup = Supervisor(box, str(tmp_path))
    s = _stalled_dealer(sup.endpoint)
    argv = ["head", "-c", str(MIB), "/dev/zero"]
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            assert len(c.exec(container, argv, capture=MIB)["stdout"]) == MIB
            rss0 = _rss(sup)
            for i in range(64):
                s.send(codec.pack({"v": 1, "id": i, "op": "exec", "container": container,
                                   "argv": argv, "capture": MIB}))

            def answered() -> bool:  # the warm-up exec and the 64
                return _metric(_scrape(sup), "warmexec_exec_exits_total", container=container,
                               code="0") == 65
            wait_for(answered, 60, "the 64 execs of the stalled client to be answered")
            grown = _rss(sup) - rss0
            dropped = _errors(sup, "REPLY_DROPPED")
            rids = [c.submit("exec", container=container, argv=argv, capture=MIB) for _ in range(64)]
            wait_for(lambda: _metric(_scrape(sup), "warmexec_exec_exits_total", container=container,
                                     code="0") == 129, 60, "the reader's 64 execs to be answered")
            got = [len(c.result(rid, timeout=30)["stdout"]) for rid in rids]
            dropped_after = _errors(sup, "REPLY_DROPPED")
    finally:
        s.close()
        assert sup.stop() == 0
    print(f"\n64 unread replies of 1 MiB: supervisor RSS +{grown / MIB:.0f} MiB, {dropped:.0f} dropped; "
          f"a reader's 64 pipelined: {got.count(MIB)} of 64 received")
    assert grown < 40 * MIB and dropped >= 32
    assert got == [MIB] * 64 and dropped_after == dropped


# ---------------------------------------------------------------- finished execs' timers

def test_finished_execs_are_released_before_their_timeout(box, container, tmp_path):
    """The issue's case: 150 execs of 1 MiB in and out and a 600 s timeout took the
    supervisor from 34 to 355 MiB."""
    sup = Supervisor(box, str(tmp_path))
    argv = ["sh", "-c", "cat >/dev/null; head -c 1048576 /dev/zero"]
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            c.exec(container, argv, capture=MIB, stdin=os.urandom(MIB), timeout=600)
            rss0 = _rss(sup)
            for _ in range(150):
                r = c.exec(container, argv, capture=MIB, stdin=os.urandom(MIB), timeout=600)
                assert len(r["stdout"]) == MIB
            grown = _rss(sup) - rss0
    finally:
        assert sup.stop() == 0
    print(f"\n150 finished execs, 1 MiB in and out, timeout 600 s: supervisor RSS +{grown / MIB:.0f} MiB")
    assert grown < 40 * MIB, f"150 finished execs held {grown / MIB:.0f} MiB"


# ------------------------------------------------------------------ the metrics endpoint

def test_idle_metrics_connections_pin_no_thread_and_a_scrape_still_answers(box, tmp_path):
    sup = Supervisor(box, str(tmp_path))
    proc = psutil.Process(sup.proc.pid)
    _scrape(sup)
    threads0 = proc.num_threads()
    conns = []
    try:
        for i in range(300):
            conn = socket.create_connection(("127.0.0.1", sup.metrics_port), timeout=5)
            if i % 2:
                conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request head
            conns.append(conn)
        t0 = time.monotonic()
        try:
            text = _scrape(sup, timeout=1)
        except OSError as exc:  # no answer within the second
            text = repr(exc)
        took = time.monotonic() - t0
        threads = proc.num_threads()
    finally:
        for conn in conns:
            conn.close()
        assert sup.stop() == 0
    print(f"\n300 idle metrics connections: threads {threads0} -> {threads}, a scrape in {took:.3f}s")
    assert "warmexec_containers" in text and took < 1, f"no scrape within a second: {text[:200]}"
    assert threads <= threads0, f"300 idle connections took {threads - threads0} threads"


# ---------------------------------------------------------- requests over the frame limit

def test_the_client_refuses_a_request_over_the_frame_limit_at_once(supervisor, container):
    """ZeroMQ drops a frame over MAXMSGSIZE unanswered (test_hostile_input.py shows it):
    the client must say so instead of waiting for a reply that cannot come."""
    with Client(supervisor.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(WarmexecError) as e:
            c.call("exec", timeout=5, container=container, argv=["wc", "-c"], stdin=b"x" * codec.MAX_MESSAGE)
        took = time.monotonic() - t0
        assert e.value.code == errors.BAD_REQUEST, e.value
        assert re.fullmatch(r"request of \d+ bytes exceeds the 4 MiB limit", e.value.message)
        assert took < 1
        assert c.exec(container, ["echo", "still"])["stdout"] == b"still\n"  # the client is fine


def test_exec_i_with_more_stdin_than_a_request_can_carry_fails_at_once(supervisor, container):
    """One-shot (--no-stream): -i alone streams its stdin, with no such limit (test_cli.py)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", "exec", "--endpoint",
                        supervisor.endpoint, "-i", "--no-stream", container, "--", "wc", "-c"],
                       input=b"x" * (24 * MIB), capture_output=True, timeout=20)
    took = time.monotonic() - t0
    assert r.returncode == 125 and r.stdout == b""
    assert b"warmexec: BAD_REQUEST: request of more than 4194304 bytes exceeds the 4 MiB limit" in r.stderr
    assert took < 10
