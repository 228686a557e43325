"""The exec path: one exec's life, from its request to its one reply.

::

    submit -> route -> [the container's own worker READY?] -> [a worker for the profile?]
           -> spawn -> "started" + pidfd (host pid from the kernel; start hooks)
                    -> "exited" + pidfd  (wait status: reply, exit hooks, metrics; ack)

The workers come from the worker table (workers.py) through ``WorkerSource``; the table
tells this path of them through the three methods of ``workers.ExecEvents``. A worker is
a process of its container and may be the container's: nothing it says is trusted
beyond its own container's execs, and every message to it is sent without blocking.
The supervisor alone kills commands: at a timeout, or when their worker is lost,
through the command's pidfd.

Every exec ends in exactly one reply through ``finish``; every way a part can die
(worker, container, timeout) ends there too, with a stable error code.
"""

from __future__ import annotations

import math
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol import errors, internal, messages
from ..protocol.errors import WarmexecError
from ..protocol.streams import StreamRequest
from . import pidfds, status
from .execs import Exec, kill_group
from .handles import Profile, Served, Worker, oom_kills
from .hooks import Hooks
from .lifecycle import State
from .loop import Loop
from .metrics import Metrics
from .streams import Send, Streams

KILL_GRACE = 1.0  # after a timeout kill, how long the worker has to report the exit
ACK_DELAY = 0.02  # at most this long a worker keeps an exited command's zombie, idle
CAPTURE_BUDGET = 512 << 20  # bytes: stdout and stderr all execs in flight may keep

Reply = Callable[[list[bytes], dict], None]
Publish = Callable[[str, dict], None]


class WorkerSource(Protocol):
    """What the exec path needs of the worker table."""

    def get(self, name: str) -> Served | None: ...

    def make_room(self, c: Served, profile: Profile) -> None:
        """Raise BUSY if no worker of a new profile may start in c."""

    def start_worker(self, c: Served, profile: Profile) -> Worker: ...

    def send(self, w: Worker, msg: dict, fds: list[int] = ()) -> None:
        """Without blocking; OSError if the worker is gone."""

    def lose(self, c: Served, w: Worker, reason: str) -> None:
        """w is of no more use (wedged): let it go, failing its execs."""


class ExecPath:
    def __init__(self, loop: Loop, table: WorkerSource, reply: Reply, metrics: Metrics | None,
                 hooks: Hooks | None, publish: Publish | None, max_inflight: int,
                 max_per_container: int, send_event: Send | None = None) -> None:
        self.loop = loop
        self.table = table
        self.send_reply = reply
        self.metrics = metrics
        self.hooks = hooks
        self.publish = publish
        self.max_inflight = max_inflight
        self.max_per_container = max_per_container
        self.active = 0  # execs received and not yet answered
        self.captured = 0  # what the execs in flight may keep of their output, in bytes
        # Must workers report each start at once (start hooks, the event stream)?
        self.announce = publish is not None or (hooks is not None and hooks.wants("start"))
        # Streamed execs (streams.py): their events go out through send_event.
        self.streams = Streams(loop, send_event, self.fail, self.tell) if send_event is not None else None

    # ---- from request to worker ------------------------------------------------------
    def submit(self, envelope: list[bytes], req_id: Any, req: messages.ExecRequest) -> None:
        c = self.table.get(req.container)
        if c is None:
            raise errors.no_such_container(req.container)
        if c.state == State.FATAL:
            raise WarmexecError(errors.WORKER_UNAVAILABLE,
                                f"cannot join container {c.name}: {c.own.life.last_error}")
        if c.paused():
            raise WarmexecError(errors.CONTAINER_PAUSED, f"container {c.name} is paused")
        if self.active >= self.max_inflight or c.open_execs() >= self.max_per_container:
            raise WarmexecError(errors.BUSY, "too many execs in flight; retry later")
        if self.captured + 2 * req.capture > CAPTURE_BUDGET:
            raise WarmexecError(errors.BUSY, "too much output could be kept for the execs in flight; "
                                             "retry later or ask for less capture")
        if req.stream is not None and self.streams is None:
            raise WarmexecError(errors.BAD_REQUEST, "this server does not stream")
        self.table.make_room(c, (req.user or "", req.privileged))
        ex = Exec(envelope, req_id, req)
        if req.stream is not None:
            self.streams.open(ex, envelope, req_id)
        self.active += 1
        self.captured += 2 * req.capture
        if ex.deadline is not None:  # cancelled when it ends: a timer must not keep it
            ex.timers.append(self.loop.call_at(ex.deadline, lambda: self.on_timeout(c, ex)))
        self.route(c, ex)

    def route(self, c: Served, ex: Exec) -> None:
        """To its profile's worker once the container's own is READY (a container that
        cannot be joined fails every profile alike)."""
        if not c.own.ready:
            c.own.waiting.append(ex)
            return
        profile = (ex.req.user or "", ex.req.privileged)
        w = c.workers.get(profile) or self.table.start_worker(c, profile)
        if w.ready:
            self.spawn(c, w, ex)
        else:
            w.waiting.append(ex)

    def worker_ready(self, c: Served, w: Worker) -> None:
        waiting, w.waiting = w.waiting, []
        for ex in waiting:
            self.route(c, ex)

    def spawn(self, c: Served, w: Worker, ex: Exec) -> None:
        if w.outbox.full():
            return self.fail(ex, errors.BUSY, f"the worker of {c.name} is not reading its requests")
        req = ex.req
        if ex.stream is None:
            stdin, streamed, announce = ex.open_stdin(), {}, self.announce
            has_stdin = bool(stdin)
        else:  # its stdio pipes are ours; its start is announced at once
            try:
                stdin, streamed = self.streams.pipes(ex.stream)
            except OSError as exc:
                return self.fail(ex, errors.SPAWN_FAILED, f"no pipes for the exec: {exc.strerror}")
            has_stdin, announce = req.stream.interactive, True
        ex.dispatched = w.last_used = time.monotonic()  # before the worker can start it
        try:
            self.table.send(w, internal.spawn(ex.exec_id, req.argv, req.env, req.cwd, req.capture,
                                              has_stdin, announce, w.exit_seq, **streamed), stdin)
            w.acked = w.exit_seq
        except OSError as exc:
            ex.close()
            return self.fail(ex, errors.WORKER_LOST, f"worker unreachable: {exc.strerror}")
        ex.worker = w
        w.inflight[ex.exec_id] = ex
        if ex.stdin_fd >= 0:
            if ex.write_stdin():
                ex.close_stdin()
            else:
                self.loop.add(ex.stdin_fd, lambda _m: self.on_stdin(ex), select.EPOLLOUT)

    def tell(self, ex: Exec, msg: dict) -> None:
        """A message about a dispatched exec to its worker (a stream's resize)."""
        w = ex.worker
        if w is not None and not ex.done and not (w.outbox is not None and w.outbox.full()):
            try:
                self.table.send(w, msg)
            except OSError:
                pass  # the worker is gone: its loss ends the exec

    def on_stdin(self, ex: Exec) -> None:
        if ex.write_stdin():
            self.loop.remove(ex.stdin_fd)
            ex.close_stdin()

    def stream_request(self, envelope: list[bytes], req_id: Any, req: StreamRequest,
                       check: Callable[[messages.ExecRequest], None]) -> dict | None:
        """A request about a streamed exec (protocol/streams.py): its reply, or None.
        check: the key's access rules, asked of the exec's own request."""
        if self.streams is None:
            raise WarmexecError(errors.BAD_REQUEST, "this server does not stream")
        started_as = self.streams.request_of(req.exec_id)
        if started_as is not None:
            check(started_as)
        return self.streams.request(envelope, req_id, req)

    # ---- from the worker -------------------------------------------------------------
    def worker_message(self, c: Served, w: Worker, op: str, msg: dict, pidfd: int,
                       pids: tuple[int, int] | None) -> None:
        """op is one of internal.FROM_WORKER and msg fits its schema; pidfd (-1: none)
        is what fdinfo says pids are."""
        try:
            ex = w.inflight.get(msg["id"])
            if ex is None:
                return
            if op == internal.EXITED:
                self.on_exited(c, w, ex, msg, pidfd, pids)
            elif op == internal.STARTED:
                if ex.started is None:
                    self.on_started(c, w, ex, msg, pidfd, pids)
            elif op == internal.OUT:
                out = ex.output[msg["stream"] == 2]
                if len(out) + len(msg["data"]) > ex.req.capture:
                    raise ValueError("output past the exec's capture")  # no worker of ours sends that
                out += msg["data"]
            else:
                del w.inflight[ex.exec_id]
                self.on_failed(c, ex, msg)
        finally:  # its pidfd read (or not), the worker may reap the command
            if op == internal.EXITED and msg["seq"] > w.exit_seq:
                self.ack_later(w, msg["seq"])

    def on_started(self, c: Served, w: Worker, ex: Exec, msg: dict, pidfd: int,
                   pids: tuple[int, int] | None, announced: bool = True) -> None:
        """The worker spawned the command (and, unless announced, it has exited: a
        zombie the worker keeps until our ack). Its pidfd is the only word on it that is
        taken: the host pid and the container pid come from the kernel, and only if the
        process is in the container's pid namespace; a running command's pidfd is kept,
        to kill its group at its timeout or if its worker is lost."""
        now = time.monotonic()
        at = msg["started_at"]  # CLOCK_MONOTONIC is shared; a lying worker skews only its own
        ex.started = min(max(at, ex.dispatched or ex.received), now) if math.isfinite(at) else now
        if pidfd >= 0:
            checked = pidfds.command_pids(pidfd, c.pid_ns, pids)
            if checked is not None:
                ex.pid, ex.container_pid = checked
                if announced:
                    ex.pidfd = os.dup(pidfd)
        else:  # no pidfd (an old seccomp allow-list): the worker's word, used for
            ex.container_pid = msg["pid"]  # nothing but the reply and finding it to kill
        if self.metrics is not None:
            self.metrics.spawned(c.name, ex.started - ex.received)
        if announced:
            if ex.timed_out:  # its timeout came first: kill it now
                self.kill_command(c, w, ex)
            if ex.stream is not None:
                self.streams.started(ex.stream)
            self.exec_event("start", c, ex)

    def on_exited(self, c: Served, w: Worker, ex: Exec, msg: dict, pidfd: int,
                  pids: tuple[int, int] | None) -> None:
        if ex.started is None:  # never announced: it exited that quickly
            self.on_started(c, w, ex, msg, pidfd, pids, announced=False)
        fields = ex.result(msg)
        del w.inflight[ex.exec_id]
        if fields["signal"] == signal.SIGKILL:
            if c.dying():  # killed because its pid namespace is being torn down
                return self.fail(ex, errors.CONTAINER_EXITED, f"container {c.name} exited")
            count = oom_kills(c.info)
            fields["oom_killed"], c.oom_seen = count > c.oom_seen and not ex.timed_out, count
        else:
            fields["timed_out"] = False  # it exited on its own before the kill landed
        self.finish(ex, c, messages.ok_reply(ex.req_id, **fields))

    def on_failed(self, c: Served, ex: Exec, msg: dict) -> None:
        code, message, exit_code = status.spawn_failure(msg["errno"], msg["stage"], ex.req.argv[0],
                                                        ex.req.cwd)
        if exit_code is None:
            return self.fail(ex, code, message)
        self.finish(ex, c, messages.ok_reply(
            ex.req_id, exit_code=exit_code, signal=None, core_dumped=False, pid=None,
            container_pid=None, stdout=b"", stderr=f"warmexec: {message}\n".encode(),
            truncated=False, timed_out=False, oom_killed=False, rusage=None,
            timings=ex.timings(time.monotonic()), exec_error={"code": code, "message": message}))

    def ack_later(self, w: Worker, seq: int) -> None:
        """Let the worker reap its zombies up to seq: with the next spawn, or alone
        ACK_DELAY from now if none goes out by then."""
        w.exit_seq = seq
        if not w.ack_pending:
            w.ack_pending = True
            self.loop.call_at(time.monotonic() + ACK_DELAY, lambda: self._send_ack(w))

    def _send_ack(self, w: Worker) -> None:
        w.ack_pending = False
        if w.outbox is not None and w.exit_seq > w.acked:
            try:
                self.table.send(w, internal.ack(w.exit_seq))
                w.acked = w.exit_seq
            except OSError:
                pass

    def worker_lost(self, c: Served, w: Worker, code: str, message: str) -> None:
        """Before w is killed: its commands too, those it never sent a pidfd of found
        among its children (they lead their own groups), then their execs answered."""
        unknown = [ex for ex in w.inflight.values() if ex.pidfd < 0]
        if unknown:
            for pidfd, host, _ in pidfds.children(w.pid, c.pid_ns):
                kill_group(pidfd, host)
                os.close(pidfd)
        inflight, w.inflight = w.inflight, {}
        for ex in inflight.values():
            self.fail(ex, code, message)

    # ---- timeouts ----------------------------------------------------------------------
    def on_timeout(self, c: Served, ex: Exec) -> None:
        """Kill the command's group ourselves, through its pidfd (a stopped or frozen
        worker cannot delay that). A command not announced yet is killed when it is
        (within the worker's ANNOUNCE_AFTER, unless the worker is stopped)."""
        if ex.done:
            return
        w = ex.worker
        if w is None or ex.exec_id not in w.inflight:  # still waiting for a worker
            for worker in c.workers.values():
                if ex in worker.waiting:
                    worker.waiting.remove(ex)
            return self.fail(ex, errors.TIMEOUT, f"no worker was ready within {ex.req.timeout}s")
        ex.timed_out = True
        self.kill_command(c, w, ex)
        ex.timers.append(self.loop.call_at(time.monotonic() + KILL_GRACE,
                                           lambda: self._kill_overdue(c, w, ex)))

    def kill_command(self, c: Served, w: Worker, ex: Exec) -> None:
        if ex.pidfd >= 0:
            return ex.kill_group()
        if ex.container_pid is None:
            return  # not announced yet
        for pidfd, host, container_pid in pidfds.children(w.pid, c.pid_ns):  # no pidfd was sent
            if container_pid == ex.container_pid:
                kill_group(pidfd, host)
            os.close(pidfd)

    def _kill_overdue(self, c: Served, w: Worker, ex: Exec) -> None:
        """Killed at its timeout, and still no word of its exit: answer now, saying why."""
        if ex.done:
            return
        w.inflight.pop(ex.exec_id, None)
        if c.paused():
            return self.fail(ex, errors.CONTAINER_PAUSED,
                             f"timed out after {ex.req.timeout}s: container {c.name} is paused")
        state = w.state_letter()
        if ex.started is None:
            why = "the command never started: its spawn was stopped inside the container"
        elif state in ("T", "t"):
            why = "its worker was stopped inside the container and could not report its exit"
        else:
            why = "its worker did not report its exit"
        self.fail(ex, errors.TIMEOUT, f"timed out after {ex.req.timeout}s and killed; {why}")
        if ex.started is None or state in ("T", "t"):  # a wedged worker serves no one: replace it
            self.table.lose(c, w, f"wedged ({why})")

    # ---- the one reply -----------------------------------------------------------------
    def exec_event(self, kind: str, c: Served, ex: Exec, result: dict | None = None) -> None:
        """An exec started or exited: to hooks and the event stream (never logged at
        info: that would be a line per exec)."""
        hooks = self.hooks is not None and self.hooks.wants(kind)
        if not hooks and self.publish is None:
            return
        doc = {"exec_id": ex.exec_id, "container": c.name, "pid": ex.pid,
               "container_pid": ex.container_pid, "argv": ex.req.argv, "user": ex.req.user or "",
               "privileged": ex.req.privileged}
        if result is not None:
            doc.update({k: result.get(k) for k in ("exit_code", "signal", "timed_out", "oom_killed",
                                                   "timings")})
        if hooks:
            self.hooks.fire(kind, doc)
        if self.publish is not None:
            self.publish("exec.started" if kind == "start" else "exec.exited", doc)

    def fail(self, ex: Exec, code: str, message: str) -> None:
        self.finish(ex, None, messages.error_reply(ex.req_id, code, message))

    def finish(self, ex: Exec, c: Served | None, reply: dict) -> None:
        if ex.done:
            return
        st = ex.stream
        if st is not None and reply["ok"] and not st.exited:  # its exit goes once its output is sent
            for timer in ex.timers:
                timer.cancel()
            ex.timers.clear()
            return self.streams.exited(st, lambda: self.finish(ex, c, reply))
        ex.done = True
        self.active -= 1
        self.captured -= 2 * ex.req.capture
        for timer in ex.timers:
            timer.cancel()
        ex.timers.clear()
        if ex.stdin_fd >= 0:
            self.loop.remove(ex.stdin_fd)
        if not reply["ok"]:
            ex.kill_group()  # a lost exec must not leave its process running
        ex.close()
        if self.metrics is not None:  # counted before the client can read the reply
            self.metrics.finished(ex, reply)
        if st is not None:
            self.streams.finished(st, reply)
        else:
            self.send_reply(ex.envelope, reply)
        if c is not None and reply["ok"] and reply.get("pid") is not None:
            self.exec_event("exit", c, ex, reply)
