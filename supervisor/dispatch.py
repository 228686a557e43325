"""The Dispatcher: the container table and each container's workers.

Containers come and go with discovery (and attach/detach); each has a state machine
for its own worker (see containers.py) and a worker per other credential profile,
forked by the zygote on demand. The exec half of the Dispatcher is in flow.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ..protocol import errors, ipc
from ..protocol.errors import WarmexecError
from . import discovery
from .containers import DEFAULT, MAX_FAILURES, Runtime, State, Worker
from .flow import ExecFlow, dying

log = logging.getLogger("warmexec")

WORKER_IDLE = 60.0  # workers of other profiles than the container's own, unused this long, go


class ZygoteLost(Exception):
    pass


class Dispatcher(ExecFlow):
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
        self.forks: dict[int, tuple[Runtime, Worker]] = {}
        self.tags = itertools.count(1)
        self.active = 0  # execs received and not yet answered
        self.skipped: dict[str, float] = {}  # state file -> mtime seen unusable
        self.loop.call_at(time.monotonic() + WORKER_IDLE, self.sweep_workers)

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
        if dying(rt):
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
        for sp in list(rt.workers.values()):
            self.drop_worker(rt, sp, code, f"container {rt.name} exited ({reason})")
        self.loop.remove(rt.init_pidfd)
        rt.close()
        self.emit("container.removed", container=rt.name, reason=reason)

    def describe(self) -> list[dict]:
        return [rt.describe() for rt in self.containers.values()]

    # ---- workers: one process per (container, credential profile) -----------------
    def start_worker(self, rt: Runtime, key: tuple[str, bool] = DEFAULT) -> Worker:
        """Ask the zygote for a worker of rt with the key's (user, privileged) profile."""
        if key == DEFAULT and rt.state == State.BACKOFF:
            rt.transition(State.STARTING)
        sp = rt.workers[key] = Worker(key)
        tag = next(self.tags)
        self.forks[tag] = (rt, sp)
        self.zygote.fork(tag, rt.info.spec(), key[0] or None, key[1])
        return sp

    def on_zygote(self) -> None:
        msg, fds = ipc.recv(self.zygote.sock)
        if msg is None:
            raise ZygoteLost()
        rt, sp = self.forks.pop(msg.get("tag"), (None, None))
        if rt is None or rt.workers.get(sp.key) is not sp:
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
            if rt.workers.get(sp.key) is sp:
                self.lost(rt, sp, "zygote died")

    def on_worker(self, rt: Runtime, sp: Worker) -> None:
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

    def on_ready(self, rt: Runtime, sp: Worker) -> None:
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

    def lost(self, rt: Runtime, sp: Worker, reason: str) -> None:
        """A worker is gone (socket closed, or its fork failed)."""
        dead = dying(rt)
        code = (errors.CONTAINER_EXITED if dead else sp.error_code or errors.WORKER_LOST)
        self.drop_worker(rt, sp, code, f"{rt.name}: {'container exited' if dead else reason}")
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

    def drop_worker(self, rt: Runtime, sp: Worker, code: str, message: str) -> None:
        if rt.workers.get(sp.key) is sp:
            del rt.workers[sp.key]
        if sp.sock is not None:
            self.loop.remove(sp.sock.fileno())
            sp.close()
        for ex in [*sp.waiting, *sp.inflight.values()]:
            self.fail(ex, code, message)
        sp.waiting, sp.inflight = [], {}

    def sweep_workers(self) -> None:
        now = time.monotonic()
        for rt in self.containers.values():
            for sp in list(rt.workers.values()):
                idle = not sp.inflight and not sp.waiting and now - sp.last_used > WORKER_IDLE
                if idle and sp.key != DEFAULT and sp.ready:
                    self.drop_worker(rt, sp, errors.INTERNAL, "idle")
        self.loop.call_at(now + WORKER_IDLE, self.sweep_workers)

    def close(self) -> None:
        for rt in list(self.containers.values()):
            self.remove(rt, "supervisor stopping")
