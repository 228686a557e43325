"""The worker table: the containers being served and every worker of theirs.

Containers come and go with discovery (``sync_discovered``) and attach/detach. Each has
its own worker (the DEFAULT profile), started when the container appears and restarted
with backoff when it dies, and a worker per other credential profile, started on first
use and let go when idle. Every worker's life is a Lifecycle (lifecycle.py); the zygote
(zygote.py) forks them all.

The exec path (execpath.py) uses the table through ``get``, ``make_room``,
``start_worker`` and ``lose``; the table tells it of workers through ``ExecEvents``:
ready, a message about an exec, or execs to fail because their worker is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from typing import Protocol

from ..protocol import errors, internal, ipc
from ..protocol.errors import WarmexecError
from . import discovery, pidfds
from .execs import Exec
from .handles import DEFAULT, Profile, Served, Worker, oom_kills
from .lifecycle import Emit, State
from .loop import Loop
from .metrics import Metrics
from .names import Names, engine, image
from .zygote import Forked, Zygote

log = logging.getLogger("warmexec")

WORKER_IDLE = 60.0  # seconds unused before a worker of another profile than DEFAULT goes
WORKER_START_TIMEOUT = 10.0  # seconds from the fork request to a ready worker
MAX_PROFILES = 8  # warm workers per container beside its own


class ExecEvents(Protocol):
    """What the table tells the exec path."""

    def worker_ready(self, c: Served, w: Worker) -> None:
        """w is READY: send it what waits for it."""

    def worker_message(self, c: Served, w: Worker, op: str, msg: dict, pidfd: int,
                       pids: tuple[int, int] | None) -> None:
        """A message about one of w's execs (checked against its schema); pidfd, -1 if
        none, is the table's to close afterwards."""

    def worker_lost(self, c: Served, w: Worker, code: str, message: str) -> None:
        """w is about to be killed: answer the execs in flight in it, killing their
        commands (a lost exec must not leave its process running)."""

    def fail(self, ex: Exec, code: str, message: str) -> None:
        """Answer an exec that waited for a worker with an error."""


class WorkerTable:
    def __init__(self, loop: Loop, emit: Emit, metrics: Metrics | None) -> None:
        self.loop = loop
        self.emit = emit
        self.metrics = metrics
        self.execs: ExecEvents | None = None  # set by the exec path
        self.containers: dict[str, Served] = {}
        self.forks: dict[int, tuple[Served, Worker]] = {}  # zygote tag -> what it forks
        self.skipped: dict[str, float] = {}  # state file -> mtime seen unusable
        self.names = Names()
        self.zygote = Zygote(loop, self.on_forked)
        self.loop.call_at(time.monotonic() + WORKER_IDLE, self.sweep_idle)

    def get(self, cid: str) -> Served | None:
        return self.containers.get(cid)

    def serving(self, cid: str) -> bool:
        """Is cid served, its init alive?"""
        c = self.containers.get(cid)
        return c is not None and not c.dying()

    def canonical(self, ref: str) -> str:
        """The id of the served container ref names (its id, a name, or a unique id
        prefix: see names.py); ref itself if it names none. AMBIGUOUS if a prefix of
        several."""
        if ref in self.containers:
            return ref  # the common case, on every exec
        return self.names.resolve(ref, self.containers) or ref

    # ---- containers --------------------------------------------------------------
    def sync_discovered(self, seen: dict[str, tuple[str, str]]) -> None:
        for name, c in list(self.containers.items()):
            if c.info.source != "attach" and name not in seen:
                self.remove(c, "state removed")
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

    def add(self, info: discovery.Container) -> Served:
        c = Served(info, os.pidfd_open(info.init_pid), self.emit)
        if info.init_start is not None and discovery.start_time(info.init_pid) != info.init_start:
            c.close()
            raise discovery.DiscoveryError(f"{info.id}: init pid {info.init_pid} was reused")
        if c.dying():
            c.close()
            raise discovery.DiscoveryError(f"{info.id}: init pid {info.init_pid} has exited")
        self.containers[info.id] = c
        self.names.add(info)
        self.loop.add(c.init_pidfd, lambda _m: self.remove(c, "container exited"))
        pod, namespace = info.kubernetes()
        self.emit("container.added", container=info.id, pid=info.init_pid, source=info.source,
                  pod=pod, namespace=namespace)
        self._fork(c, c.own)
        return c

    def attach(self, name: str, pid: int) -> None:
        if name in self.containers:
            raise WarmexecError(errors.EXISTS, f"a container named {name} is already active")
        try:
            self.add(discovery.from_pid(name, pid))
        except (discovery.DiscoveryError, OSError) as exc:
            raise WarmexecError(errors.NO_SUCH_CONTAINER, f"cannot attach pid {pid}: {exc}") from None

    def detach(self, name: str) -> None:
        c = self.containers.get(name)
        if c is None or c.info.source != "attach":
            raise errors.no_such_container(name)
        self.remove(c, "detached")

    def remove(self, c: Served, reason: str) -> None:
        if self.containers.get(c.name) is not c:
            return
        del self.containers[c.name]
        self.names.remove(c.name)
        if c.dying():
            code, message = errors.CONTAINER_EXITED, f"container {c.name} exited ({reason})"
        else:  # its state went (moved, deleted) or it was detached, but it still runs
            code, message = errors.NO_SUCH_CONTAINER, f"container {c.name} is no longer served ({reason})"
        for w in list(c.workers.values()):
            self.drop(c, w, code, message, reason)
        self.loop.remove(c.init_pidfd)
        c.close()
        self.emit("container.removed", container=c.name, reason=reason)

    def describe(self) -> list[dict]:
        rows = []
        for c in self.containers.values():
            kind, ns = engine(c.info)
            pod, pod_ns = c.info.kubernetes()
            rows.append({**c.describe(), "name": self.names.name(c.name), "engine": kind,
                         "containerd_namespace": ns, "image": image(c.info, self.names.docker.get(c.name)),
                         "cri_container_type": c.info.cri_container_type(),
                         "pod": pod, "namespace": pod_ns})
        return rows

    # ---- starting workers ---------------------------------------------------------
    def start_worker(self, c: Served, profile: Profile) -> Worker:
        """A new worker of another profile than the container's own (make_room first)."""
        w = c.workers[profile] = Worker(c.name, profile, self.emit)
        self._fork(c, w)
        return w

    def make_room(self, c: Served, profile: Profile) -> None:
        """At most MAX_PROFILES warm workers of other profiles per container (each is a
        process in the container's cgroups): let the least recently used idle one go,
        or answer BUSY."""
        if profile in c.workers:
            return  # the common case, on every exec: nothing to build
        others = [w for p, w in c.workers.items() if p != DEFAULT]
        if len(others) < MAX_PROFILES:
            return
        idle = [w for w in others if w.ready and not w.inflight and not w.waiting]
        if not idle:
            raise WarmexecError(errors.BUSY, f"{MAX_PROFILES} other users are busy in {c.name}; retry later")
        self.drop(c, min(idle, key=lambda w: w.last_used), errors.INTERNAL, "evicted", "evicted")

    def _fork(self, c: Served, w: Worker) -> None:
        """Ask the zygote for w's process; one that is not READY by WORKER_START_TIMEOUT
        is killed and counts as a failure."""
        tag = self.zygote.fork(c.info.process.get("seccomp"))
        w.fork_tag, w.fork_at = tag, time.monotonic()
        self.forks[tag] = (c, w)
        overdue = self.loop.call_at(w.fork_at + WORKER_START_TIMEOUT, lambda: self._start_overdue(c, w, tag))
        w.timers.append(overdue)

    def _start_overdue(self, c: Served, w: Worker, tag: int) -> None:
        if w.fork_tag == tag and w.state in (State.STARTING, State.JOINING):
            self.lose(c, w, f"not ready within {WORKER_START_TIMEOUT:g}s (state {w.state_letter() or '?'})")

    def on_forked(self, tag: int, forked: Forked) -> None:
        c, w = self.forks.pop(tag, (None, None))
        current = c is not None and w.fork_tag == tag and w.state == State.STARTING
        if forked.sock is None:
            if current:
                self.lose(c, w, forked.error)
            return
        if not current:
            forked.sock.close()  # dropped meanwhile: the joiner sees EOF and exits
            os.close(forked.pidfd)
            return
        w.attach(forked.sock, forked.pid, forked.pidfd)
        w.life.transition(State.JOINING)
        self.loop.add(forked.sock.fileno(), lambda mask: self.on_worker(c, w, mask))
        try:
            w.send(internal.join(c.info.spec(), w.profile[0] or None, w.profile[1]))
        except OSError as exc:
            self.lose(c, w, f"joiner unreachable: {exc.strerror}")

    # ---- a worker's socket ----------------------------------------------------------
    def send(self, w: Worker, msg: dict, fds: list[int] = ()) -> None:
        """Send without blocking; what waits arms EPOLLOUT. Takes ownership of fds."""
        if w.send(msg, fds):
            self.loop.modify(w.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def on_worker(self, c: Served, w: Worker, mask: int) -> None:
        if mask & select.EPOLLOUT:
            try:
                if not w.outbox.flush():
                    self.loop.modify(w.sock.fileno(), select.EPOLLIN)
            except OSError:
                w.outbox.close()  # the worker is gone: its EOF follows
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        # The worker is a process of the container, which may have taken it over: its
        # messages are decoded within FROM_WORKER's bounds and checked against their
        # schema; the only descriptor it may pass is one pidfd; anything else drops it.
        try:
            msg, fds = ipc.recv(w.sock, ipc.FROM_WORKER)
        except ipc.Malformed as bad:
            pidfds.dispose(bad.fds)
            return self.lose(c, w, f"the worker sent an undecodable message ({bad})")
        if msg is None:
            return self.lose(c, w, w.error or "worker exited")
        pids = pidfds.fdinfo_pids(fds[0]) if len(fds) == 1 else None
        try:
            if fds and pids is None:
                raise ValueError("descriptors other than one pidfd")
            if w.ready:
                op = internal.check(msg, internal.FROM_WORKER)
                self.execs.worker_message(c, w, op, msg, fds[0] if fds else -1, pids)
            elif internal.check(msg, internal.FROM_JOINER) == internal.READY:
                self.on_ready(c, w, fds)
            else:
                self.on_fatal(c, w, msg)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            self.lose(c, w, f"the worker sent a malformed message ({type(exc).__name__}: {exc})")
        finally:
            if pids is not None:
                os.close(fds[0])  # a pidfd: its close never waits
            else:
                pidfds.dispose(fds)

    def on_ready(self, c: Served, w: Worker, fds: list[int]) -> None:
        """The joiner forked the worker: from now on the handle is the worker's (checked
        to be the joiner's child in the container: the pid in the message is not used)."""
        found = pidfds.worker_pidfd(fds, w.pid, self.zygote.pid, c.pid_ns)
        if found is None:
            raise ValueError("ready names no child of the joiner in the container")
        w.set_process(*found)
        w.life.transition(State.READY)
        w.cancel_timers()
        if w is c.own and self.metrics is not None:
            self.metrics.warmup(time.monotonic() - w.fork_at)
        self.execs.worker_ready(c, w)

    def on_fatal(self, c: Served, w: Worker, msg: dict) -> None:
        """The joiner could not set up; its EOF follows, and w is lost for this reason."""
        w.error, w.error_code = msg["message"][:500], msg["code"]
        # No retry can help a missing privilege or a profile we refuse to apply.
        c.hopeless |= w is c.own and (msg["errno"] in (errno.EPERM, errno.EACCES) or bool(w.error_code))

    # ---- losing workers ---------------------------------------------------------------
    def lose(self, c: Served, w: Worker, reason: str) -> None:
        """A worker is gone (its socket closed, its fork failed, late, or misbehaving):
        answer its execs; restart the container's own after a backoff, or give up."""
        if w.state not in (State.STARTING, State.JOINING, State.READY):
            return  # already lost
        if c.dying():
            return self.remove(c, "container exited")
        count = oom_kills(c.info)
        oom = count > c.oom_seen
        if oom:  # the worker is charged to the container: its memory limit can take it
            reason = f"{reason}; the container's OOM killer killed a process (memory limit)"
        c.oom_seen = count
        # What its joiner said (an unknown user, say) is the whole answer; a loss names
        # the container.
        code, message = w.error_code, reason
        if not code:
            code, message = errors.WORKER_LOST, f"{c.name}: {reason}"
        if w is not c.own:
            return self.drop(c, w, code, message, reason)
        self._let_go(c, w, code, message)
        w.life.transition(State.BACKOFF, reason)
        c.restarts += 1  # deaths of its own worker: restarted, or given up on just below
        if self.metrics is not None:
            self.metrics.worker_restart()
        if c.hopeless or (w.life.out_of_retries() and not oom):  # memory comes back
            w.life.transition(State.FATAL, reason)
            self._fail_all(w.waiting, errors.WORKER_UNAVAILABLE, f"cannot serve container {c.name}: {reason}")
            return
        w.timers.append(self.loop.call_at(w.life.retry_at, lambda: self._restart(c, w)))

    def _restart(self, c: Served, w: Worker) -> None:
        if w.state == State.BACKOFF and self.containers.get(c.name) is c:
            w.life.transition(State.STARTING)
            self._fork(c, w)

    def drop(self, c: Served, w: Worker, code: str, message: str, reason: str) -> None:
        """Let a worker go for good (EXITED), answering every exec waiting for it or in it."""
        if c.workers.get(w.profile) is w and w is not c.own:
            del c.workers[w.profile]
        self._let_go(c, w, code, message)
        self._fail_all(w.waiting, code, message)
        if w.state != State.EXITED:
            w.life.transition(State.EXITED, reason)

    def _let_go(self, c: Served, w: Worker, code: str, message: str) -> None:
        """Answer the execs in flight in w, kill its process (it lives in the container,
        which could keep it from ever reading its EOF) and close its socket."""
        w.cancel_timers()
        w.fork_tag = 0
        if w.inflight:
            self.execs.worker_lost(c, w, code, message)
        w.kill()
        if w.sock is not None:
            self.loop.remove(w.sock.fileno())
        w.close()

    def _fail_all(self, execs: list[Exec], code: str, message: str) -> None:
        for ex in list(execs):
            self.execs.fail(ex, code, message)
        execs.clear()

    def sweep_idle(self) -> None:
        now = time.monotonic()
        for c in self.containers.values():
            for w in list(c.workers.values()):
                if w is not c.own and w.ready and w.idle_since(now - WORKER_IDLE):
                    self.drop(c, w, errors.INTERNAL, "idle", "idle")
        self.loop.call_at(now + WORKER_IDLE, self.sweep_idle)

    def close(self) -> None:
        for c in list(self.containers.values()):
            self.remove(c, "supervisor stopping")
        self.zygote.close()
