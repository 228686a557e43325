"""The life of one exec, from request to reply (the Dispatcher's exec half).

Path of one exec (docs/ARCHITECTURE.md draws it)::

    submit -> route -> [container's worker READY?] -> [worker for (user, privileged)?]
           -> send_spawn -> "started" + pidfd (host pid from the kernel; start hooks;
                                               "seen" back, so the worker may reap)
                         -> "exited"  (wait status: reply, exit hooks, metrics)

The worker is a process of its container and may be the container's: nothing it says
is trusted beyond its own container's execs, and every message to it is sent without
blocking. A timeout is enforced here, through the command's pidfd.

Every exec ends in exactly one reply through ``finish``; every way a part can die
(worker, container, timeout) ends there too, with a stable error code.
"""

from __future__ import annotations

import math
import os
import select
import signal
import time
from typing import Any

from ..protocol import errors, messages
from ..protocol.errors import WarmexecError
from . import status
from .containers import DEFAULT, Runtime, State, Worker, oom_kills
from .execs import Exec
from .pidfds import command_pids, stat_fields

KILL_GRACE = 1.0  # after a timeout kill, how long the worker has to report the exit
ACK_DELAY = 0.02  # at most this long a worker keeps an exited command's zombie, idle
MAX_PROFILES = 8  # warm workers per container beside its own


class ExecFlow:
    """Mixed into the Dispatcher, which holds the state these methods use: ``loop``,
    ``containers``, ``metrics``, ``hooks``, ``publish``, ``send_reply``, the in-flight
    limits and ``active``; and which provides ``start_worker``, ``send_to`` and ``lost``."""

    def on_exec_message(self, rt: Runtime, sp: Worker, op: str, msg: dict, fds: list[int],
                        pids: tuple[int, int] | None) -> None:
        """fds: at most one pidfd, pids what its fdinfo says (see pidfds)."""
        try:
            self.on_exec_event(rt, sp, op, msg, fds, pids)
        finally:  # its pidfd read (or not), the worker may reap the command
            if op == "exited" and isinstance(msg.get("seq"), int) and msg["seq"] > sp.exit_seq:
                self.ack_later(sp, msg["seq"])

    def on_exec_event(self, rt: Runtime, sp: Worker, op: str, msg: dict, fds: list[int],
                      pids: tuple[int, int] | None) -> None:
        ex = sp.inflight.get(msg.get("id"))
        if ex is None:
            return
        if op == "started" and ex.started is None:
            self.on_started(rt, ex, msg, fds, pids)
        elif op == "out":
            data, out = msg["data"], ex.output[msg.get("stream") == 2]
            if not isinstance(data, bytes) or len(out) + len(data) > ex.req.capture:
                raise ValueError("output past the exec's capture")  # no worker of ours sends that
            out += data
        elif op == "failed":
            del sp.inflight[ex.exec_id]
            self.on_failed(rt, ex, msg)
        elif op == "exited":
            if ex.started is None:  # never announced: it exited that quickly
                self.on_started(rt, ex, msg, fds, pids, announced=False)
            fields = ex.result(msg)  # first: a malformed message leaves the exec in flight
            del sp.inflight[ex.exec_id]
            if fields["signal"] == signal.SIGKILL:
                if dying(rt):  # killed because its pid namespace is being torn down
                    return self.fail(ex, errors.CONTAINER_EXITED, f"container {rt.name} exited")
                count = oom_kills(rt.info)
                fields["oom_killed"], rt.oom_seen = count > rt.oom_seen and not ex.timed_out, count
            else:
                fields["timed_out"] = False  # it exited on its own before the kill landed
            self.finish(ex, rt, messages.ok_reply(ex.req_id, **fields))

    def on_started(self, rt: Runtime, ex: Exec, msg: dict, fds: list[int], pids: tuple[int, int] | None,
                   announced: bool = True) -> None:
        """The worker spawned the command (and, unless announced, it has exited: a
        zombie the worker keeps until our ack). Its pidfd is the only word on it that is
        taken: the host pid and the container pid come from the kernel, and only if the
        process is in the container's pid namespace; a running command's pidfd is kept,
        to kill its group at its timeout or if its worker is lost."""
        now = time.monotonic()
        at = msg.get("started_at")  # CLOCK_MONOTONIC is shared; a lying worker skews only its own
        valid = isinstance(at, float) and math.isfinite(at)
        ex.started = min(max(at, ex.dispatched or ex.received), now) if valid else now
        if fds:
            checked = command_pids(fds[0], rt.pid_ns, pids)
            if checked is not None:
                ex.pid, ex.container_pid = checked
                if announced:
                    ex.pidfd = os.dup(fds[0])
        elif isinstance(msg.get("pid"), int):  # no pidfd (seccomp): the worker's word,
            ex.container_pid = msg["pid"]       # used for nothing but the reply
        if self.metrics is not None:
            self.metrics.spawned(rt.name, ex.started - ex.received)
        if announced:
            self.hook("start", rt, ex)

    def on_failed(self, rt: Runtime, ex: Exec, msg: dict) -> None:
        code, message, exit_code = status.spawn_failure(msg.get("errno", 0), msg.get("stage", ""),
                                                        ex.req.argv[0], ex.req.cwd)
        if exit_code is None:
            return self.fail(ex, code, message)
        self.finish(ex, rt, messages.ok_reply(
            ex.req_id, exit_code=exit_code, signal=None, core_dumped=False, pid=None,
            container_pid=None, stdout=b"", stderr=f"warmexec: {message}\n".encode(),
            truncated=False, timed_out=False, oom_killed=False, rusage=None,
            timings=ex.timings(time.monotonic()), exec_error={"code": code, "message": message}))

    # ---- execs -------------------------------------------------------------------
    def total_inflight(self) -> int:
        return self.active

    def submit(self, envelope: list[bytes], req_id: Any, req: messages.ExecRequest) -> None:
        rt = self.containers.get(req.container)
        if rt is None:
            raise errors.no_such_container(req.container)
        if rt.state == State.FATAL:
            raise WarmexecError(errors.WORKER_UNAVAILABLE,
                                f"cannot join container {rt.name}: {rt.last_error}")
        if rt.paused():
            raise WarmexecError(errors.CONTAINER_PAUSED, f"container {rt.name} is paused")
        if self.active >= self.max_inflight or rt.inflight() >= self.max_per_container:
            raise WarmexecError(errors.BUSY, "too many execs in flight; retry later")
        self.make_room(rt, (req.user or "", req.privileged))
        ex = Exec(envelope, req_id, req)
        self.active += 1
        if ex.deadline is not None:  # cancelled when it ends: a timer must not keep it
            ex.timers.append(self.loop.call_at(ex.deadline, lambda: self.on_timeout(rt, ex)))
        self.route(rt, ex)

    def make_room(self, rt: Runtime, key: tuple[str, bool]) -> None:
        """At most MAX_PROFILES warm workers of other profiles per container (each is a
        process in the container's cgroups): let the least recently used idle one go,
        or answer BUSY."""
        if key == DEFAULT or key in rt.workers:
            return  # the common case, on every exec: nothing to build
        others = [sp for k, sp in rt.workers.items() if k != DEFAULT]
        if len(others) < MAX_PROFILES:
            return
        idle = [sp for sp in others if sp.ready and not sp.inflight and not sp.waiting]
        if not idle:
            raise WarmexecError(errors.BUSY, f"{MAX_PROFILES} other users are busy in "
                                             f"{rt.name}; retry later")
        self.drop_worker(rt, min(idle, key=lambda sp: sp.last_used), errors.INTERNAL, "evicted")

    def route(self, rt: Runtime, ex: Exec) -> None:
        if rt.state != State.READY:
            rt.waiting.append(ex)
            return
        key = (ex.req.user or "", ex.req.privileged)
        sp = rt.workers.get(key) or self.start_worker(rt, key)
        if sp.ready:
            self.send_spawn(rt, sp, ex)
        else:
            sp.waiting.append(ex)

    def send_spawn(self, rt: Runtime, sp: Worker, ex: Exec) -> None:
        if sp.outbox.full():
            return self.fail(ex, errors.BUSY, f"the worker of {rt.name} is not reading its requests")
        stdin = ex.open_stdin()
        req = ex.req
        ex.dispatched = sp.last_used = time.monotonic()  # before the worker can start it
        try:
            self.send_to(sp, {"op": "spawn", "id": ex.exec_id, "argv": req.argv, "env": req.env,
                              "cwd": req.cwd, "capture": req.capture, "stdin": bool(stdin),
                              "announce": self.wants_starts(), "ack": sp.exit_seq}, stdin)
            sp.acked = sp.exit_seq
        except OSError as exc:
            ex.close()
            return self.fail(ex, errors.WORKER_LOST, f"worker unreachable: {exc.strerror}")
        ex.worker = sp
        sp.inflight[ex.exec_id] = ex
        if ex.stdin_fd >= 0:
            if ex.write_stdin():
                ex.close_stdin()
            else:
                self.loop.add(ex.stdin_fd, lambda _m: self.on_stdin(ex), select.EPOLLOUT)

    def on_stdin(self, ex: Exec) -> None:
        if ex.write_stdin():
            self.loop.remove(ex.stdin_fd)
            ex.close_stdin()

    def on_timeout(self, rt: Runtime, ex: Exec) -> None:
        """Kill the command's group ourselves, through its pidfd (a stopped or frozen
        worker cannot delay that); ask the worker only for a command we have none of."""
        if ex.done:
            return
        sp = ex.worker
        if sp is None or ex.exec_id not in sp.inflight:  # still waiting for a worker
            for queue in (rt.waiting, *(s.waiting for s in rt.workers.values())):
                if ex in queue:
                    queue.remove(ex)
            return self.fail(ex, errors.TIMEOUT, f"no worker was ready within {ex.req.timeout}s")
        ex.timed_out = True
        if ex.pidfd >= 0:
            ex.kill_group()
        else:
            try:
                self.send_to(sp, {"op": "kill", "id": ex.exec_id, "signal": signal.SIGKILL})
            except OSError:
                pass
        ex.timers.append(self.loop.call_at(time.monotonic() + KILL_GRACE,
                                           lambda: self._kill_overdue(rt, sp, ex)))

    def _kill_overdue(self, rt: Runtime, sp: Worker, ex: Exec) -> None:
        """Killed at its timeout, and still no word of its exit: answer now, saying why."""
        if ex.done:
            return
        sp.inflight.pop(ex.exec_id, None)
        if rt.paused():
            return self.fail(ex, errors.CONTAINER_PAUSED,
                             f"timed out after {ex.req.timeout}s: container {rt.name} is paused")
        state = sp.state_letter()
        if ex.started is None:
            why = "the command never started: its spawn was stopped inside the container"
        elif state in ("T", "t"):
            why = "its worker was stopped inside the container and could not report its exit"
        else:
            why = "its worker did not report its exit"
        self.fail(ex, errors.TIMEOUT, f"timed out after {ex.req.timeout}s and killed; {why}")
        if ex.started is None or state in ("T", "t"):  # a wedged worker serves no one: replace it
            self.lost(rt, sp, f"wedged ({why})")

    def wants_starts(self) -> bool:
        """Must workers report each start at once (start hooks, the event stream)?"""
        return self.publish is not None or (self.hooks is not None and self.hooks.wants("start"))

    def ack_later(self, sp: Worker, seq: int) -> None:
        """Let the worker reap its zombies up to seq: with the next spawn, or alone
        ACK_DELAY from now if none goes out by then."""
        sp.exit_seq = seq
        if not sp.ack_pending:
            sp.ack_pending = True
            self.loop.call_at(time.monotonic() + ACK_DELAY, lambda: self._send_ack(sp))

    def _send_ack(self, sp: Worker) -> None:
        sp.ack_pending = False
        if sp.outbox is not None and sp.exit_seq > sp.acked:
            try:
                self.send_to(sp, {"op": "ack", "ack": sp.exit_seq})
                sp.acked = sp.exit_seq
            except OSError:
                pass

    def hook(self, kind: str, rt: Runtime, ex: Exec, result: dict | None = None) -> None:
        """An exec started or exited: for hooks and the event stream (never logged at
        info: that would be a line per exec)."""
        hooks = self.hooks is not None and self.hooks.wants(kind)
        if not hooks and self.publish is None:
            return
        doc = {"exec_id": ex.exec_id, "container": rt.name, "pid": ex.pid,
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

    def finish(self, ex: Exec, rt: Runtime | None, reply: dict) -> None:
        if ex.done:
            return
        ex.done = True
        self.active -= 1
        for timer in ex.timers:
            timer.cancel()
        ex.timers.clear()
        if ex.stdin_fd >= 0:
            self.loop.remove(ex.stdin_fd)
        if not reply.get("ok"):
            ex.kill_group()  # a lost exec must not leave its process running
        ex.close()
        if self.metrics is not None:  # counted before the client can read the reply
            self.metrics.finished(ex, reply)
        self.send_reply(ex.envelope, reply)
        if rt is not None and reply.get("ok") and reply.get("pid") is not None:
            self.hook("exit", rt, ex, reply)


PF_EXITING = 0x4


def dying(rt: Runtime) -> bool:
    """True once the container's init has exited or is exiting.

    A pid namespace's init is killed first but its pidfd turns readable only after
    every other process in the namespace (our commands among them) has been reaped: so
    a worker's death, or its command's, is seen first, and init's PF_EXITING flag tells the two apart.
    """
    p = select.poll()
    p.register(rt.init_pidfd, select.POLLIN)
    if p.poll(0):
        return True
    fields = stat_fields(rt.info.init_pid)
    return len(fields) < 7 or fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)
