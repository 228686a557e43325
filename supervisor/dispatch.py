"""Routing execs: container table, workers, spawners, and the life of each exec.

Path of one exec (docs/ARCHITECTURE.md draws it)::

    submit -> route -> [worker READY?] -> [spawner for (user, privileged)?] -> send_spawn
           -> "started" (pid known: start hooks, spawn latency)
           -> "exited"  (wait status: reply, exit hooks, metrics)

Every exec ends in exactly one reply through ``finish``; every way a part can die
(worker, spawner, container, timeout) ends there too, with a stable error code.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from ..protocol import errors, ipc, messages
from ..protocol.errors import WarmexecError
from . import discovery, status
from .containers import DEFAULT, MAX_FAILURES, Runtime, Spawner, State, oom_kills
from .execs import Exec

log = logging.getLogger("warmexec")

KILL_GRACE = 2.0  # after a timeout kill, how long the spawner has to report the exit
SPAWNER_IDLE = 60.0  # non-default spawners unused this long are let go


class ZygoteLost(Exception):
    pass


class Dispatcher:
    def __init__(self, loop: Any, zygote: Any, reply: Callable[[list[bytes], dict], None],
                 metrics: Any, hooks: Any, max_inflight: int, max_per_container: int,
                 publish: Callable[[str, dict], None] | None = None) -> None:
        self.publish = publish
        self.loop = loop
        self.zygote = zygote
        self.send_reply = reply
        self.metrics = metrics
        self.hooks = hooks
        self.max_inflight = max_inflight
        self.max_per_container = max_per_container
        self.containers: dict[str, Runtime] = {}
        self.forks: dict[int, tuple[Runtime, Spawner]] = {}
        self.tags = itertools.count(1)
        self.active = 0  # execs received and not yet answered
        self.skipped: dict[str, float] = {}  # state file -> mtime seen unusable
        self.loop.call_at(time.monotonic() + SPAWNER_IDLE, self.sweep_spawners)

    # ---- events ------------------------------------------------------------------
    def emit(self, topic: str, **fields: Any) -> None:
        """One internal event: the log, the metrics and the event stream all see it."""
        log.info(topic, extra={"fields": fields})
        if self.metrics is not None:
            self.metrics.event(topic, fields)
        if self.publish is not None:
            self.publish(topic, fields)

    def count_error(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.error(code)

    # ---- containers --------------------------------------------------------------
    def sync_discovered(self, seen: dict[str, tuple[str, str]]) -> None:
        for name, rt in list(self.containers.items()):
            if rt.info.source != "attach" and name not in seen:
                self.remove(rt, "state removed")
        for cid, (root, directory) in seen.items():
            if cid in self.containers:
                continue
            path = discovery.state_file(directory)
            try:
                mtime = os.stat(path).st_mtime if path else None
            except OSError:
                mtime = None
            if mtime is None or self.skipped.get(path) == mtime:
                continue  # not written yet, or unusable and unchanged since
            try:
                self.add(discovery.load(root, cid, path))
                self.skipped.pop(path, None)
            except (discovery.DiscoveryError, OSError) as exc:
                self.skipped[path] = mtime  # e.g. a stopped container: retry if it changes
                log.debug("skipping %s: %s", cid, exc)

    def add(self, info: discovery.Container) -> Runtime:
        pidfd = os.pidfd_open(info.init_pid)
        rt = Runtime(info, pidfd, self.emit)
        if info.init_start is not None and discovery.start_time(info.init_pid) != info.init_start:
            rt.close()
            raise discovery.DiscoveryError(f"{info.id}: init pid {info.init_pid} was reused")
        if _dying(rt):
            rt.close()
            raise discovery.DiscoveryError(f"{info.id}: init pid {info.init_pid} has exited")
        self.containers[info.id] = rt
        self.loop.add(pidfd, lambda _m: self.remove(rt, "container exited"))
        pod, namespace = info.kubernetes()
        self.emit("container.added", container=info.id, pid=info.init_pid, source=info.source,
                  pod=pod, namespace=namespace)
        self.start_worker(rt)
        return rt

    def attach(self, name: str, pid: int) -> None:
        if name in self.containers:
            raise WarmexecError(errors.EXISTS, f"a container named {name} is already active")
        try:
            self.add(discovery.from_pid(name, pid))
        except (discovery.DiscoveryError, OSError) as exc:
            raise WarmexecError(errors.NO_SUCH_CONTAINER, f"cannot attach pid {pid}: {exc}") from None

    def detach(self, name: str) -> None:
        rt = self.containers.get(name)
        if rt is None or rt.info.source != "attach":
            raise errors.no_such_container(name)
        self.remove(rt, "detached")

    def remove(self, rt: Runtime, reason: str) -> None:
        if self.containers.get(rt.name) is not rt:
            return
        del self.containers[rt.name]
        rt.transition(State.EXITED, reason)
        code = errors.CONTAINER_EXITED
        for ex in list(rt.waiting):
            self.fail(ex, code, f"container {rt.name} exited ({reason})")
        for sp in list(rt.spawners.values()):
            self.drop_spawner(rt, sp, code, f"container {rt.name} exited ({reason})")
        self.loop.remove(rt.init_pidfd)
        rt.close()
        self.emit("container.removed", container=rt.name, reason=reason)

    def describe(self) -> list[dict]:
        return [rt.describe() for rt in self.containers.values()]

    # ---- workers: one process per (container, credential profile) -----------------
    def start_worker(self, rt: Runtime, key: tuple[str, bool] = DEFAULT) -> Spawner:
        """Ask the zygote for a worker of rt with the key's (user, privileged) profile."""
        if key == DEFAULT and rt.state == State.BACKOFF:
            rt.transition(State.STARTING)
        sp = rt.spawners[key] = Spawner(key)
        tag = next(self.tags)
        self.forks[tag] = (rt, sp)
        self.zygote.fork(tag, rt.info.spec(), key[0] or None, key[1])
        return sp

    def on_zygote(self) -> None:
        msg, fds = ipc.recv(self.zygote.sock)
        if msg is None:
            raise ZygoteLost()
        rt, sp = self.forks.pop(msg.get("tag"), (None, None))
        if rt is None or rt.spawners.get(sp.key) is not sp:
            for fd in fds:
                os.close(fd)  # dropped meanwhile: the worker sees EOF and exits
            return
        if not fds:
            return self.lost(rt, sp, f"fork failed: {msg.get('error')}")
        sp.sock = socket.socket(fileno=fds[0])
        sp.pid = msg["pid"]
        if sp.key == DEFAULT:
            rt.transition(State.JOINING)
        self.loop.add(fds[0], lambda _m: self.on_worker(rt, sp))

    def zygote_replaced(self, zygote: Any) -> None:
        """The zygote died: workers it was forking are lost; later ones use the new one."""
        self.zygote = zygote
        pending, self.forks = self.forks, {}
        for rt, sp in pending.values():
            if rt.spawners.get(sp.key) is sp:
                self.lost(rt, sp, "zygote died")

    def on_worker(self, rt: Runtime, sp: Spawner) -> None:
        msg, fds = ipc.recv(sp.sock)
        for fd in fds:  # workers send no descriptors
            os.close(fd)
        if msg is None:
            return self.lost(rt, sp, sp.error or "worker exited")
        op = msg.get("op")
        if op == "ready":
            self.on_ready(rt, sp)
        elif op == "fatal":
            sp.error, sp.error_code = msg.get("message", ""), msg.get("code") or ""
            # No retry can help a missing privilege or a profile we refuse to apply.
            rt.hopeless |= sp.key == DEFAULT and (msg.get("errno") in (errno.EPERM, errno.EACCES)
                                                  or bool(sp.error_code))
        elif op == "container_exited":
            self.remove(rt, "container exited")
        else:
            self.on_exec_message(rt, sp, op, msg)

    def on_ready(self, rt: Runtime, sp: Spawner) -> None:
        sp.ready = True
        if sp.key == DEFAULT:
            rt.transition(State.READY)
            if self.metrics is not None:
                self.metrics.warmup(time.monotonic() - rt.since)
            waiting, rt.waiting = rt.waiting, []
            for ex in waiting:
                self.route(rt, ex)
        waiting, sp.waiting = sp.waiting, []
        for ex in waiting:
            self.send_spawn(rt, sp, ex)

    def lost(self, rt: Runtime, sp: Spawner, reason: str) -> None:
        """A worker is gone (socket closed, or its fork failed)."""
        dead = _dying(rt)
        code = (errors.CONTAINER_EXITED if dead else sp.error_code or errors.WORKER_LOST)
        self.drop_spawner(rt, sp, code, f"{rt.name}: {'container exited' if dead else reason}")
        if dead:
            return self.remove(rt, "container exited")
        if sp.key != DEFAULT:
            return  # the next exec with that profile forks a new one
        rt.last_error = reason
        rt.transition(State.BACKOFF, reason)
        rt.restarts += 1
        if self.metrics is not None:
            self.metrics.worker_restart()
        if rt.failures >= MAX_FAILURES or rt.hopeless:
            rt.transition(State.FATAL, reason)
            for ex in rt.waiting:
                self.fail(ex, errors.WORKER_UNAVAILABLE, f"cannot serve container {rt.name}: {reason}")
            rt.waiting = []
            return
        self.loop.call_at(rt.retry_at, lambda: rt.state == State.BACKOFF and self.start_worker(rt))

    def drop_spawner(self, rt: Runtime, sp: Spawner, code: str, message: str) -> None:
        if rt.spawners.get(sp.key) is sp:
            del rt.spawners[sp.key]
        if sp.sock is not None:
            self.loop.remove(sp.sock.fileno())
            sp.close()
        for ex in [*sp.waiting, *sp.inflight.values()]:
            self.fail(ex, code, message)
        sp.waiting, sp.inflight = [], {}

    def on_exec_message(self, rt: Runtime, sp: Spawner, op: str, msg: dict) -> None:
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
            oom = False
            if os.WIFSIGNALED(msg["status"]) and os.WTERMSIG(msg["status"]) == signal.SIGKILL:
                if _dying(rt):  # killed because its pid namespace is being torn down
                    return self.fail(ex, errors.CONTAINER_EXITED, f"container {rt.name} exited")
                count = oom_kills(rt.info)
                oom, rt.oom_seen = count > rt.oom_seen and not ex.timed_out, count
            self.finish(ex, rt, messages.ok_reply(ex.req_id, **ex.result(msg, oom)))

    def on_started(self, rt: Runtime, ex: Exec, msg: dict) -> None:
        ex.started = msg.get("started_at") or time.monotonic()  # CLOCK_MONOTONIC: shared
        ex.pid, ex.container_pid = msg.get("pid"), msg.get("container_pid")
        if ex.pid is not None:
            try:  # kept, to kill the group if the exec is lost
                ex.pidfd = os.pidfd_open(ex.pid)
            except OSError:
                pass  # it has already exited
        if self.metrics is not None:
            self.metrics.spawned(rt.name, ex.started - ex.received)
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

    def sweep_spawners(self) -> None:
        now = time.monotonic()
        for rt in self.containers.values():
            for sp in list(rt.spawners.values()):
                idle = not sp.inflight and not sp.waiting and now - sp.last_used > SPAWNER_IDLE
                if idle and sp.key != DEFAULT and sp.ready:
                    self.drop_spawner(rt, sp, errors.INTERNAL, "idle")
        self.loop.call_at(now + SPAWNER_IDLE, self.sweep_spawners)

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
        ex = Exec(envelope, req_id, req)
        self.active += 1
        if ex.deadline is not None:
            self.loop.call_at(ex.deadline, lambda: self.on_timeout(rt, ex))
        self.route(rt, ex)

    def route(self, rt: Runtime, ex: Exec) -> None:
        if rt.state != State.READY:
            rt.waiting.append(ex)
            return
        key = (ex.req.user or "", ex.req.privileged)
        sp = rt.spawners.get(key) or self.start_worker(rt, key)
        if sp.ready:
            self.send_spawn(rt, sp, ex)
        else:
            sp.waiting.append(ex)

    def send_spawn(self, rt: Runtime, sp: Spawner, ex: Exec) -> None:
        stdin = ex.open_stdin()
        req = ex.req
        ex.dispatched = sp.last_used = time.monotonic()  # before the spawner can start it
        try:
            ipc.send(sp.sock, {"op": "spawn", "id": ex.exec_id, "argv": req.argv, "env": req.env,
                               "cwd": req.cwd, "capture": req.capture}, stdin)
        except OSError as exc:
            ex.close()
            return self.fail(ex, errors.WORKER_LOST, f"spawner unreachable: {exc.strerror}")
        finally:
            for fd in stdin:
                os.close(fd)
        ex.spawner = sp
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
        sp = ex.spawner
        if sp is None or ex.exec_id not in sp.inflight:  # still waiting for a worker
            for queue in (rt.waiting, *(s.waiting for s in rt.spawners.values())):
                if ex in queue:
                    queue.remove(ex)
            return self.fail(ex, errors.TIMEOUT, f"no worker was ready within {ex.req.timeout}s")
        ex.timed_out = True
        try:
            ipc.send(sp.sock, {"op": "kill", "id": ex.exec_id, "signal": signal.SIGKILL})
        except OSError:
            pass
        self.loop.call_at(time.monotonic() + KILL_GRACE, lambda: self._kill_overdue(sp, ex))

    def _kill_overdue(self, sp: Spawner, ex: Exec) -> None:
        if not ex.done:
            sp.inflight.pop(ex.exec_id, None)
            self.fail(ex, errors.WORKER_LOST, "the spawner did not report the killed process")

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

    def close(self) -> None:
        for rt in list(self.containers.values()):
            self.remove(rt, "supervisor stopping")


PF_EXITING = 0x4


def _dying(rt: Runtime) -> bool:
    """True once the container's init has exited or is exiting.

    A pid namespace's init is killed first but its pidfd turns readable only after
    every other process in the namespace (our spawners among them) has died: so a
    spawner's death is seen first, and init's PF_EXITING flag tells the two apart.
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
