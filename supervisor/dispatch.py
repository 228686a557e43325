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
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from ..protocol import errors, ipc
from ..protocol.errors import WarmexecError
from . import discovery, pidfds
from .containers import DEFAULT, MAX_FAILURES, Runtime, State, Worker, oom_kills
from .flow import ExecFlow, dying

log = logging.getLogger("warmexec")

WORKER_IDLE = 60.0  # workers of other profiles than the container's own, unused this long, go
WORKER_START_TIMEOUT = 10.0  # seconds from the fork request to a ready worker


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
        if dying(rt):
            code, message = errors.CONTAINER_EXITED, f"container {rt.name} exited ({reason})"
        else:  # its state went (moved, deleted) or it was detached, but it still runs
            code, message = errors.NO_SUCH_CONTAINER, f"container {rt.name} is no longer served ({reason})"
        for ex in list(rt.waiting):
            self.fail(ex, code, message)
        for sp in list(rt.workers.values()):
            self.drop_worker(rt, sp, code, message)
        self.loop.remove(rt.init_pidfd)
        rt.close()
        self.emit("container.removed", container=rt.name, reason=reason)

    def describe(self) -> list[dict]:
        return [rt.describe() for rt in self.containers.values()]

    # ---- workers: one process per (container, credential profile) -----------------
    def start_worker(self, rt: Runtime, key: tuple[str, bool] = DEFAULT) -> Worker:
        """Ask the zygote for a worker of rt with the key's (user, privileged) profile;
        one that is not ready by WORKER_START_TIMEOUT is killed and counts as a failure."""
        if key == DEFAULT and rt.state == State.BACKOFF:
            rt.transition(State.STARTING)
        sp = rt.workers[key] = Worker(key)
        tag = next(self.tags)
        self.forks[tag] = (rt, sp)
        self.zygote.fork(tag, rt.info.process.get("seccomp"))
        self.loop.call_at(time.monotonic() + WORKER_START_TIMEOUT, lambda: self.start_overdue(rt, sp))
        return sp

    def start_overdue(self, rt: Runtime, sp: Worker) -> None:
        if rt.workers.get(sp.key) is sp and not sp.ready:
            state = sp.state_letter() or "?"
            self.lost(rt, sp, f"not ready within {WORKER_START_TIMEOUT:g}s (state {state})")

    def on_zygote(self) -> None:
        msg, fds = ipc.recv(self.zygote.sock)
        if msg is None:
            raise ZygoteLost()
        rt, sp = self.forks.pop(msg.get("tag"), (None, None))
        if rt is None or rt.workers.get(sp.key) is not sp or len(fds) != 2:
            for fd in fds:
                os.close(fd)  # dropped meanwhile: the worker sees EOF and exits
            if rt is not None and rt.workers.get(sp.key) is sp:
                self.lost(rt, sp, f"fork failed: {msg.get('error')}")
            return
        sp.attach(socket.socket(fileno=fds[0]), msg["pid"], fds[1])
        if sp.key == DEFAULT:
            rt.transition(State.JOINING)
        self.loop.add(fds[0], lambda mask: self.on_worker(rt, sp, mask))
        try:
            self.send_to(sp, {"op": "join", "spec": rt.info.spec(), "user": sp.key[0] or None,
                              "privileged": sp.key[1]})
        except OSError as exc:
            self.lost(rt, sp, f"joiner unreachable: {exc.strerror}")

    def zygote_replaced(self, zygote: Any) -> None:
        """The zygote died: workers it was forking are lost; later ones use the new one.
        Workers already forked live on: they are in their containers, not its children."""
        self.zygote = zygote
        pending, self.forks = self.forks, {}
        for rt, sp in pending.values():
            if rt.workers.get(sp.key) is sp:
                self.lost(rt, sp, "zygote died")

    def send_to(self, sp: Worker, msg: dict, fds: list[int] = ()) -> None:
        """Send without blocking; what waits arms EPOLLOUT. Takes ownership of fds."""
        if sp.outbox.send(msg, fds):
            self.loop.modify(sp.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def on_worker(self, rt: Runtime, sp: Worker, mask: int) -> None:
        if mask & select.EPOLLOUT:
            try:
                if not sp.outbox.flush():
                    self.loop.modify(sp.sock.fileno(), select.EPOLLIN)
            except OSError:
                sp.outbox.close()  # the worker is gone: its EOF follows
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        # The worker is a process of the container, which may have taken it over: its
        # messages are decoded within FROM_WORKER's bounds, the only descriptor it may
        # pass is one pidfd, and anything else it sends drops it.
        try:
            msg, fds = ipc.recv(sp.sock, ipc.FROM_WORKER)
        except ipc.Malformed as bad:
            pidfds.dispose(bad.fds)
            return self.lost(rt, sp, f"the worker sent an undecodable message ({bad})")
        if msg is None:
            return self.lost(rt, sp, sp.error or "worker exited")
        pids = pidfds.fdinfo_pids(fds[0]) if len(fds) == 1 else None
        try:
            if fds and pids is None:
                raise ValueError("descriptors other than one pidfd")
            self.on_worker_message(rt, sp, msg, fds, pids)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            self.lost(rt, sp, f"the worker sent a malformed message ({type(exc).__name__}: {exc})")
        finally:
            if pids is not None:
                os.close(fds[0])  # a pidfd: its close never waits
            else:
                pidfds.dispose(fds)

    def on_worker_message(self, rt: Runtime, sp: Worker, msg: dict, fds: list[int],
                          pids: tuple[int, int] | None) -> None:
        op = msg.get("op")
        if op == "ready" and not sp.ready:
            self.on_ready(rt, sp, msg, fds)
        elif op == "fatal" and not sp.ready:
            sp.error, sp.error_code = str(msg.get("message", ""))[:500], str(msg.get("code") or "")
            # No retry can help a missing privilege or a profile we refuse to apply.
            rt.hopeless |= sp.key == DEFAULT and (msg.get("errno") in (errno.EPERM, errno.EACCES)
                                                  or bool(sp.error_code))
        elif sp.ready:
            self.on_exec_message(rt, sp, op, msg, fds, pids)

    def on_ready(self, rt: Runtime, sp: Worker, msg: dict, fds: list[int]) -> None:
        """The joiner forked the worker: from now on the handle is the worker's (checked
        to be the joiner's child in the container: the pid in the message is not used)."""
        found = pidfds.worker_pidfd(fds, sp.pid, self.zygote.proc.pid, rt.pid_ns)
        if found is None:
            raise ValueError("ready names no child of the joiner in the container")
        sp.set_process(*found)
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
        """A worker is gone (socket closed, fork failed, late, or misbehaving)."""
        dead = dying(rt)
        count = oom_kills(rt.info)
        oom = not dead and count > rt.oom_seen
        if oom:  # the worker is charged to the container: its memory limit can take it
            reason = f"{reason}; the container's OOM killer killed a process (memory limit)"
        rt.oom_seen = count
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
        if rt.hopeless or (rt.failures >= MAX_FAILURES and not oom):  # memory comes back
            rt.transition(State.FATAL, reason)
            for ex in rt.waiting:
                self.fail(ex, errors.WORKER_UNAVAILABLE, f"cannot serve container {rt.name}: {reason}")
            rt.waiting = []
            return
        self.loop.call_at(rt.retry_at, lambda: rt.state == State.BACKOFF and self.start_worker(rt))

    def drop_worker(self, rt: Runtime, sp: Worker, code: str, message: str) -> None:
        """Let a worker go: killed (it lives in the container, which could keep it from
        ever reading its EOF), its socket closed, its execs answered."""
        if rt.workers.get(sp.key) is sp:
            del rt.workers[sp.key]
        sp.kill()
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

