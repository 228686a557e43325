"""The life of one exec, from request to reply (the Dispatcher's exec half).

Path of one exec (docs/ARCHITECTURE.md draws it)::

    submit -> route -> [container's worker READY?] -> [worker for (user, privileged)?]
           -> send_spawn -> "started" (pid known: start hooks, spawn latency)
                         -> "exited"  (wait status: reply, exit hooks, metrics)

"started" comes at once only when start hooks or the event stream want it, or when
the container shares our pid namespace (the zygote then cannot tell a dead worker's
commands from their daemons: the supervisor kills those by pid); otherwise the worker
sends it for commands still running after a moment (worker.spawner's ANNOUNCE_AFTER),
and a quicker command's "exited" carries its pid and start time.

Every exec ends in exactly one reply through ``finish``; every way a part can die
(worker, container, timeout) ends there too, with a stable error code.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

from ..protocol import errors, ipc, messages
from ..protocol.errors import WarmexecError
from . import status
from .containers import DEFAULT, Runtime, State, Worker, oom_kills
from .execs import Exec

KILL_GRACE = 2.0  # after a timeout kill, how long the worker has to report the exit
MAX_PROFILES = 8  # warm workers per container beside its own


class ExecFlow:
    """Mixed into the Dispatcher, which holds the state these methods use: ``loop``,
    ``containers``, ``metrics``, ``hooks``, ``publish``, ``send_reply``, the in-flight
    limits and ``active``; and which provides ``start_worker``."""

    def on_exec_message(self, rt: Runtime, sp: Worker, op: str, msg: dict) -> None:
        ex = sp.inflight.get(msg.get("id"))
        if ex is None:
            return
        if op == "started":
            self.on_started(rt, ex, msg)
        elif op == "out":
            ex.output[msg.get("stream") == 2].extend(msg.get("data", b""))
        elif op == "failed":
            del sp.inflight[ex.exec_id]
            self.on_failed(rt, ex, msg)
        elif op == "exited":
            del sp.inflight[ex.exec_id]
            if ex.started is None:  # never announced: it exited that quickly
                self.on_started(rt, ex, msg, announced=False)
            oom = False
            if os.WIFSIGNALED(msg["status"]) and os.WTERMSIG(msg["status"]) == signal.SIGKILL:
                if dying(rt):  # killed because its pid namespace is being torn down
                    return self.fail(ex, errors.CONTAINER_EXITED, f"container {rt.name} exited")
                count = oom_kills(rt.info)
                oom, rt.oom_seen = count > rt.oom_seen and not ex.timed_out, count
            self.finish(ex, rt, messages.ok_reply(ex.req_id, **ex.result(msg, oom)))

    def on_started(self, rt: Runtime, ex: Exec, msg: dict, announced: bool = True) -> None:
        ex.started = msg.get("started_at") or time.monotonic()  # CLOCK_MONOTONIC: shared
        ex.pid, ex.container_pid = msg.get("pid"), msg.get("container_pid")
        if self.metrics is not None:
            self.metrics.spawned(rt.name, ex.started - ex.received)
        if not announced:
            return
        if ex.pid is not None:
            try:  # kept, to kill the group if the exec is lost
                ex.pidfd = os.pidfd_open(ex.pid)
            except OSError:
                pass  # it has already exited
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
        if ex.deadline is not None:
            self.loop.call_at(ex.deadline, lambda: self.on_timeout(rt, ex))
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
        stdin = ex.open_stdin()
        req = ex.req
        ex.dispatched = sp.last_used = time.monotonic()  # before the worker can start it
        try:
            ipc.send(sp.sock, {"op": "spawn", "id": ex.exec_id, "argv": req.argv, "env": req.env,
                               "cwd": req.cwd, "capture": req.capture,
                               "announce": self.wants_starts() or "pid" not in rt.info.namespaces},
                     stdin)
        except OSError as exc:
            ex.close()
            return self.fail(ex, errors.WORKER_LOST, f"worker unreachable: {exc.strerror}")
        finally:
            for fd in stdin:
                os.close(fd)
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
        if ex.done:
            return
        sp = ex.worker
        if sp is None or ex.exec_id not in sp.inflight:  # still waiting for a worker
            for queue in (rt.waiting, *(s.waiting for s in rt.workers.values())):
                if ex in queue:
                    queue.remove(ex)
            return self.fail(ex, errors.TIMEOUT, f"no worker was ready within {ex.req.timeout}s")
        ex.timed_out = True
        try:
            ipc.send(sp.sock, {"op": "kill", "id": ex.exec_id, "signal": signal.SIGKILL})
        except OSError:
            pass
        self.loop.call_at(time.monotonic() + KILL_GRACE, lambda: self._kill_overdue(sp, ex))

    def _kill_overdue(self, sp: Worker, ex: Exec) -> None:
        if not ex.done:
            sp.inflight.pop(ex.exec_id, None)
            self.fail(ex, errors.WORKER_LOST, "the worker did not report the killed process")

    def wants_starts(self) -> bool:
        """Must workers report each start at once (start hooks, the event stream)?"""
        return self.publish is not None or (self.hooks is not None and self.hooks.wants("start"))

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
    try:
        with open(f"/proc/{rt.info.init_pid}/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return True
