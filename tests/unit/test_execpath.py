"""The exec path without root or containers: a fake worker table and loop, real processes.

The "container" is this test's own pid namespace, its "init" a child process; each
worker handle talks over a real socketpair whose other end the test reads, and the
commands behind pidfds are real child processes (running, or exited and unreaped, as a
worker's zombies are until its ack).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time

import pytest

from warmexec.protocol import errors, internal, ipc, messages
from warmexec.protocol.errors import WarmexecError
from warmexec.supervisor import execpath
from warmexec.supervisor.discovery import Container
from warmexec.supervisor.execpath import ExecPath
from warmexec.supervisor.handles import DEFAULT, Served, Worker
from warmexec.supervisor.lifecycle import State
from warmexec.supervisor.pidfds import fdinfo_pids


class FakeTimer:
    def __init__(self, when: float, fn) -> None:
        self.when, self.fn = when, fn

    def cancel(self) -> None:
        self.fn = None


class FakeLoop:
    """Timers fire only when the test says so."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []
        self.fds: dict[int, object] = {}

    def call_at(self, when: float, fn) -> FakeTimer:
        timer = FakeTimer(when, fn)
        self.timers.append(timer)
        return timer

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if t.fn is not None]

    def fire(self, timer: FakeTimer) -> None:
        fn, timer.fn = timer.fn, None
        if fn is not None:
            fn()

    def fire_all(self) -> None:
        for timer in sorted(self.live(), key=lambda t: t.when):
            self.fire(timer)

    def add(self, fd: int, handler, mask: int = select.EPOLLIN) -> None:
        self.fds[fd] = handler

    def remove(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def modify(self, fd: int, mask: int) -> None:
        pass


class FakeTable:
    """The WorkerSource side of the worker table: workers are handed out READY or
    STARTING as the test sets them up; the test is their worker (the peers' other ends)."""

    def __init__(self) -> None:
        self.containers: dict[str, Served] = {}
        self.peers: dict[int, object] = {}  # id(worker) -> the worker's end of its socket
        self.lost: list[tuple[Worker, str]] = []
        self.started: list[Worker] = []

    def get(self, name: str) -> Served | None:
        return self.containers.get(name)

    def make_room(self, c: Served, profile) -> None:
        pass

    def start_worker(self, c: Served, profile) -> Worker:
        w = c.workers[profile] = Worker(c.name, profile, lambda *a, **k: None)
        self.started.append(w)
        return w

    def send(self, w: Worker, msg: dict, fds=()) -> None:
        w.send(msg, list(fds))

    def lose(self, c: Served, w: Worker, reason: str) -> None:
        self.lost.append((w, reason))

    # ---- set-up -------------------------------------------------------------------
    def make_ready(self, c: Served, w: Worker) -> None:
        ours, theirs = ipc.socketpair()
        w.attach(ours, os.getpid(), os.pidfd_open(os.getpid()))
        self.peers[id(w)] = theirs
        w.life.transition(State.JOINING)
        w.life.transition(State.READY)

    def received(self, w: Worker) -> tuple[dict, list[int]]:
        peer = self.peers[id(w)]
        peer.setblocking(False)
        return ipc.recv(peer)


@pytest.fixture
def init():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def world(init):
    loop, table, replies, events = FakeLoop(), FakeTable(), [], []
    info = Container(id="c1", init_pid=init.pid, init_start=None, namespaces=[], cgroup_procs=[],
                     process={}, source="test")
    c = Served(info, os.pidfd_open(init.pid), lambda *a, **k: None)
    table.containers["c1"] = c
    path = ExecPath(loop, table, lambda env, reply: replies.append(reply), None, None, None, 4, 3)
    yield loop, table, c, path, replies, events
    for w in c.workers.values():
        for ex in list(w.inflight.values()):
            ex.close()
    c.close()


def request(**fields) -> messages.ExecRequest:
    return messages.parse_exec({"v": 1, "id": 1, "op": "exec", "container": "c1", "argv": ["true"],
                                **fields})


def zombie(*argv: str) -> tuple[subprocess.Popen, int]:
    """A command that has exited and is not reaped: as a worker holds it until its ack."""
    proc = subprocess.Popen(list(argv or ["true"]), start_new_session=True)
    pidfd = os.pidfd_open(proc.pid)
    select.select([pidfd], [], [], 5)
    return proc, pidfd


def exited_msg(exec_id: int, pid: int, status: int = 0, seq: int = 1, stdout: bytes = b"") -> dict:
    return internal.exited(exec_id, seq, status, 0.001, 0.002, 1024, pid, time.monotonic(), stdout, b"",
                           len(stdout), 0)


def running(table: FakeTable, c: Served, path: ExecPath, **fields) -> tuple[dict, subprocess.Popen, int]:
    """An announced exec whose command (a real `sleep 60`, leading its own group) runs:
    its spawn message, the process and the pidfd the worker sent with `started`."""
    table.make_ready(c, c.own)
    path.submit([b"client"], 1, request(argv=["sleep", "60"], **fields))
    spawn, _ = table.received(c.own)
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pidfd = os.pidfd_open(proc.pid)
    path.worker_message(c, c.own, internal.STARTED, internal.started(spawn["id"], 1, time.monotonic()),
                        pidfd, fdinfo_pids(pidfd))
    return spawn, proc, pidfd


def test_a_quick_exec_is_one_message_each_way_and_its_zombie_is_acked(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    path.submit([b"client"], 7, request(argv=["sh", "-c", "exit 3"]))
    spawn, fds = table.received(c.own)
    assert internal.check(spawn, frozenset((internal.SPAWN,))) == internal.SPAWN
    assert spawn["announce"] is False and spawn["argv"] == ["sh", "-c", "exit 3"] and not fds
    proc, pidfd = zombie("sh", "-c", "exit 3")
    try:
        path.worker_message(c, c.own, internal.EXITED, exited_msg(spawn["id"], 99, 3 << 8), pidfd,
                            fdinfo_pids(pidfd))
        assert [r["exit_code"] for r in replies] == [3]
        assert replies[0]["pid"] == proc.pid and replies[0]["container_pid"] == proc.pid
        assert replies[0]["id"] == 7 and path.active == 0 and not c.own.inflight
        loop.fire_all()  # no spawn went out within ACK_DELAY: the ack goes alone
        ack, _ = table.received(c.own)
        assert ack == internal.ack(1)
    finally:
        os.close(pidfd)
        proc.wait()


def test_a_pidfd_of_a_process_outside_the_container_gives_no_pid(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    c.pid_ns = "pid:[1]"  # not this namespace: the zombie below is not "in the container"
    path.submit([b"client"], 1, request())
    spawn, _ = table.received(c.own)
    proc, pidfd = zombie()
    try:
        path.worker_message(c, c.own, internal.EXITED, exited_msg(spawn["id"], 5), pidfd, fdinfo_pids(pidfd))
        assert replies[0]["pid"] is None and replies[0]["container_pid"] is None
    finally:
        os.close(pidfd)
        proc.wait()


def test_starts_are_announced_when_someone_listens_and_the_pidfd_is_kept(world):
    loop, table, c, _, replies, events = world
    path = ExecPath(loop, table, lambda env, reply: replies.append(reply), None, None,
                    lambda topic, doc: events.append((topic, doc)), 4, 3)
    spawn, proc, pidfd = running(table, c, path)
    try:
        assert spawn["announce"] is True
        ex = c.own.inflight[spawn["id"]]
        assert ex.pid == proc.pid and ex.pidfd >= 0 and ex.pidfd != pidfd
        assert [t for t, _ in events] == ["exec.started"] and events[0][1]["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)


def test_a_timeout_kills_the_group_through_the_pidfd_and_answers_within_the_grace(world):
    loop, table, c, path, replies, _ = world
    path.announce = True  # as start hooks make it
    spawn, proc, pidfd = running(table, c, path, timeout=0.5)
    try:
        deadline = loop.live()
        assert len(deadline) == 1
        loop.fire(deadline[0])  # the timeout
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not replies  # the worker has KILL_GRACE to report the exit
        grace = loop.live()
        assert len(grace) == 1 and grace[0].when - time.monotonic() <= execpath.KILL_GRACE
        loop.fire(grace[0])
        assert replies[0]["error"]["code"] == errors.TIMEOUT
        assert "did not report its exit" in replies[0]["error"]["message"]
        assert not table.lost  # not stopped: the worker is not replaced
    finally:
        os.close(pidfd)


def test_a_timed_out_exit_report_says_timed_out_only_if_it_was_killed(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    for status, timed_out in ((signal.SIGKILL, True), (0, False)):
        path.submit([b"client"], 1, request(timeout=1))
        spawn, _ = table.received(c.own)
        c.own.inflight[spawn["id"]].timed_out = True  # the deadline has passed
        path.worker_message(c, c.own, internal.EXITED, exited_msg(spawn["id"], 5, status, seq=0), -1, None)
        assert replies[-1]["timed_out"] is timed_out and replies[-1]["oom_killed"] is False


def test_an_exec_waiting_for_a_worker_times_out_with_a_clear_error(world):
    loop, table, c, path, replies, _ = world
    path.submit([b"client"], 1, request(timeout=2))  # the container's worker is STARTING
    assert len(c.own.waiting) == 1
    loop.fire_all()
    assert replies[0]["error"]["code"] == errors.TIMEOUT and not c.own.waiting
    assert "no worker was ready" in replies[0]["error"]["message"] and path.active == 0


def test_waiting_execs_are_routed_when_the_worker_is_ready_and_other_users_get_their_own(world):
    loop, table, c, path, replies, _ = world
    path.submit([b"client"], 1, request())
    path.submit([b"client"], 2, request(user="nobody"))
    assert len(c.own.waiting) == 2 and not table.started  # no other profile before the own
    table.make_ready(c, c.own)
    path.worker_ready(c, c.own)
    spawn, _ = table.received(c.own)
    assert spawn["argv"] == ["true"]
    assert [w.profile for w in table.started] == [("nobody", False)]
    other = table.started[0]
    assert len(other.waiting) == 1
    table.make_ready(c, other)
    path.worker_ready(c, other)
    assert table.received(other)[0]["op"] == internal.SPAWN and not other.waiting


def test_a_lost_worker_fails_its_execs_in_flight_and_kills_their_commands(world):
    loop, table, c, path, replies, _ = world
    path.announce = True
    spawn, proc, pidfd = running(table, c, path)
    try:
        path.worker_lost(c, c.own, errors.WORKER_LOST, "c1: worker exited")
        assert replies[0]["error"] == {"code": errors.WORKER_LOST, "message": "c1: worker exited"}
        assert proc.wait(timeout=5) == -signal.SIGKILL and not c.own.inflight and path.active == 0
    finally:
        os.close(pidfd)


def test_output_past_capture_is_refused_as_malformed(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    path.submit([b"client"], 1, request(capture=4))
    spawn, _ = table.received(c.own)
    path.worker_message(c, c.own, internal.OUT, internal.out(spawn["id"], 1, b"abcd"), -1, None)
    with pytest.raises(ValueError):
        path.worker_message(c, c.own, internal.OUT, internal.out(spawn["id"], 2, b"abcd!"), -1, None)
    assert not replies  # the table loses the worker for it, which answers the exec


def test_a_missing_executable_is_exit_127_with_its_error(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    path.submit([b"client"], 1, request(argv=["nosuch"]))
    spawn, _ = table.received(c.own)
    failed = internal.failed(spawn["id"], errno.ENOENT, "lookup")
    path.worker_message(c, c.own, internal.FAILED, failed, -1, None)
    assert replies[0]["exit_code"] == 127 and replies[0]["exec_error"]["code"] == errors.NOT_FOUND


def test_refusals_before_any_exec_exists(world):
    loop, table, c, path, replies, _ = world
    with pytest.raises(WarmexecError) as e:
        path.submit([b"client"], 1, request(container="nope"))
    assert e.value.code == errors.NO_SUCH_CONTAINER
    for i in range(3):
        path.submit([b"client"], i, request())  # waiting: max 3 per container
    with pytest.raises(WarmexecError) as e:
        path.submit([b"client"], 9, request())
    assert e.value.code == errors.BUSY and path.active == 3
    c.own.life.transition(State.BACKOFF, "died")
    c.own.life.transition(State.FATAL, "died")
    with pytest.raises(WarmexecError) as e:
        path.submit([b"client"], 9, request())
    assert e.value.code == errors.WORKER_UNAVAILABLE and "died" in e.value.message


def test_every_exec_gets_exactly_one_reply(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    path.submit([b"client"], 1, request(timeout=5))
    spawn, _ = table.received(c.own)
    ex = c.own.inflight[spawn["id"]]
    path.worker_message(c, c.own, internal.EXITED, exited_msg(spawn["id"], 5, seq=0), -1, None)
    path.fail(ex, errors.WORKER_LOST, "late")  # a loss after the reply
    path.worker_message(c, c.own, internal.EXITED, exited_msg(spawn["id"], 5, seq=0), -1, None)  # a replay
    assert len(replies) == 1 and replies[0]["ok"] and path.active == 0
    assert not loop.live()  # its deadline was cancelled with it


def test_a_stopped_spawn_replaces_the_worker(world):
    loop, table, c, path, replies, _ = world
    table.make_ready(c, c.own)
    path.submit([b"client"], 1, request(timeout=1))
    table.received(c.own)
    loop.fire_all()  # the deadline (no "started": it was never announced), then the grace
    loop.fire_all()
    assert replies[0]["error"]["code"] == errors.TIMEOUT
    assert "never started" in replies[0]["error"]["message"]
    assert [w for w, _ in table.lost] == [c.own]


def test_default_is_the_container_own_profile(world):
    _, _, c, _, _, _ = world
    assert c.workers == {DEFAULT: c.own} and c.state == State.STARTING
