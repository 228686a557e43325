"""Soak: many execs across several containers through one DEALER, then no leak.

``WARMEXEC_SOAK_EXECS`` sets the number of execs (default 3000, so the suite stays
fast; the full soak recorded in docs/RELIABILITY.md is 100000)::

    WARMEXEC_SOAK_EXECS=100000 python3 -m pytest -q -s tests/test_soak.py

About 16 execs are kept in flight, spread over three containers: exit codes, output on
both streams, a few timeouts (`sleep 5` killed at 0.2 s) and a few missing executables.
Every request must be answered exactly once with the result its command implies. Then
the supervisor's descriptors, threads and memory, and the memory of each of its
descendants (zygote, workers), must be where they were after a warm-up, with the same
pids, and no descendant may be a zombie.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import psutil
import pytest

from warmexec.protocol import Client

from .conftest import Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root

MIB = 1 << 20
EXECS = int(os.environ.get("WARMEXEC_SOAK_EXECS", "3000"))
WARMUP = 200
INFLIGHT = 16
FD_SLACK, THREAD_SLACK = 2, 0
SUPERVISOR_RSS_SLACK = 8 * MIB
CHILD_RSS_SLACK = 2 * MIB  # the zygote, a worker


class CountingClient(Client):
    """A Client that also counts every reply it receives, by id, so a duplicate reply
    (which Client itself would drop silently) is seen."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.received: collections.Counter = collections.Counter()

    def _recv(self, wait: float) -> dict | None:
        msg = super()._recv(wait)
        if msg is not None:
            self.received[msg.get("id")] += 1
        return msg


def job(i: int, containers: list[str]) -> tuple[str, dict, dict]:
    """The i-th exec (container, request fields) and the reply fields it must get."""
    cid = containers[i % len(containers)]
    if i % 997 == 500:
        return cid, {"argv": ["sleep", "5"], "timeout": 0.2}, {
            "exit_code": 137, "timed_out": True, "stdout": b""}
    if i % 499 == 250:
        return cid, {"argv": [f"no-such-command-{i}"]}, {"exit_code": 127, "pid": None}
    if i % 4 == 0:
        out = f"out {i}\n".encode()
        return cid, {"argv": ["sh", "-c", f"echo out {i}; echo err {i} >&2; exit {i % 7}"]}, {
            "exit_code": i % 7, "stdout": out, "stderr": f"err {i}\n".encode(), "truncated": False}
    if i % 4 == 1:
        return cid, {"argv": ["head", "-c", "5000", "/dev/zero"], "capture": 1000}, {
            "exit_code": 0, "stdout": b"\0" * 1000, "truncated": True}
    k = i % 256
    return cid, {"argv": ["sh", "-c", f"exit {k}"]}, {"exit_code": k, "stdout": b"", "timed_out": False}


def run_execs(c: CountingClient, containers: list[str], first: int, count: int) -> list[int]:
    """count execs, INFLIGHT at a time; check each reply against its job; return the
    request ids."""
    ids = []
    pending: collections.deque = collections.deque()
    i, end = first, first + count
    while i < end or pending:
        while i < end and len(pending) < INFLIGHT:
            cid, fields, want = job(i, containers)
            pending.append((c.submit("exec", container=cid, **fields), i, want))
            ids.append(pending[-1][0])
            i += 1
        rid, n, want = pending.popleft()
        reply = c.result(rid, timeout=30)
        got = {k: reply.get(k) for k in want}
        assert got == want, f"exec {n}: {got} != {want}"
    return ids


ROLES = {1: "zygote", 2: "worker"}  # deeper: commands (and their zombies until the worker's ack)


class Usage:
    """The supervisor's fds, threads and RSS, and the RSS of its zygote and workers
    (named by depth: the zygote's children are workers, once their joiners exit)."""

    def __init__(self, pid: int) -> None:
        p = psutil.Process(pid)
        with p.oneshot():
            self.fds, self.threads, self.rss = p.num_fds(), p.num_threads(), p.memory_info().rss
        self.children: dict[int, tuple[str, int]] = {}
        todo = [(child, 1) for child in p.children()]
        while todo:
            child, depth = todo.pop()
            if depth not in ROLES:
                continue
            with contextlib.suppress(psutil.Error):
                self.children[child.pid] = (ROLES[depth], child.memory_info().rss)
                todo.extend((c, depth + 1) for c in child.children())

    def __str__(self) -> str:
        return f"fds {self.fds}, threads {self.threads}, RSS {self.rss / MIB:.1f} MiB"


def zombies(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@pytest.mark.timeout(120 + EXECS // 100)  # the suite's 120 s is too short for the full soak
def test_soak(box, tmp_path):
    sup = Supervisor(box, str(tmp_path))  # no hooks: the soak measures execs alone
    containers = [box.run(f"soak-{n}") for n in range(3)]
    try:
        with CountingClient(sup.endpoint) as c:
            for cid in containers:
                wait_ready(c, cid)
            ids = run_execs(c, containers, 0, WARMUP)
            before = Usage(sup.proc.pid)
            t0 = time.monotonic()
            ids += run_execs(c, containers, WARMUP, EXECS)
            seconds = time.monotonic() - t0
            assert not c.sock.poll(200), "a reply arrived after every request was answered"
            assert len(ids) == WARMUP + EXECS
            wrong = {k: c.received[k] for k in ids if c.received[k] != 1}
            assert not wrong, f"replies not exactly once: {wrong}"
            wait_for(lambda: not zombies(sup.proc.pid), 5, "no zombie among the supervisor's descendants")
            after = Usage(sup.proc.pid)
        timeouts = sum(1 for i in range(WARMUP, WARMUP + EXECS) if i % 997 == 500)
        missing = sum(1 for i in range(WARMUP, WARMUP + EXECS) if i % 499 == 250)
        print(f"\nsoak: {EXECS} execs ({timeouts} timeouts, {missing} missing executables) over "
              f"{len(containers)} containers, {INFLIGHT} in flight: {seconds:.1f}s, "
              f"{EXECS / seconds:.0f} execs/s\n  supervisor before: {before}\n  supervisor after:  {after}")
        for pid, (role, rss) in sorted(before.children.items()):
            now = after.children.get(pid, ("gone", 0))[1]
            print(f"  {role} {pid}: RSS {rss / MIB:.1f} -> {now / MIB:.1f} MiB")
        assert after.fds <= before.fds + FD_SLACK
        assert after.threads <= before.threads + THREAD_SLACK
        assert after.rss <= before.rss + SUPERVISOR_RSS_SLACK
        assert set(after.children) == set(before.children), "warmexec processes died or were added"
        for pid, (role, rss) in before.children.items():
            assert after.children[pid][1] <= rss + CHILD_RSS_SLACK, f"{role} {pid} grew"
    finally:
        assert sup.stop() == 0
        for cid in containers:
            box.delete(cid)
    assert "internal error" not in sup.read_log()
