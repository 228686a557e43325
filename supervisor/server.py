"""The supervisor's server: the loop, the ZeroMQ ROUTER, discovery and signals.

One thread runs one epoll loop (loop.py). Requests come in on the ROUTER socket,
decoded and checked (protocol/), and go to the exec path (execpath.py) or the worker
table (workers.py); replies and stream events go back through sending.py, those over
a few KiB within a byte budget per client (replies.py). Discovery rescans the state roots on inotify events
and on a timer. A second ROUTER, on an inproc endpoint only this process can reach,
takes the metrics thread's probes (exporter.py) as requests like any other; their
replies go back on it (``LOOPBACK`` heads their envelopes).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..protocol import codec, errors, messages, streams
from ..protocol.errors import WarmexecError
from . import discovery, inotify
from .auth import EVERYTHING, Auth, Rules
from .config import Config
from .endpoints import bind
from .events import Events
from .execpath import ExecPath
from .hooks import Hooks, load_python_hooks
from .loop import Loop
from .metrics import Metrics
from .names import DockerNames
from .scheduler import SCHEDULED, Scheduler
from .sending import LOOPBACK, NOBLOCK, Sender
from .workers import WorkerTable

log = logging.getLogger("warmexec")

BATCH = 64  # requests served per turn of the loop
MAX_FRAMES = 8  # identities (proxies add one each), the REQ delimiter, payload
MAX_ENVELOPE = 4096  # bytes of all of them but the payload
SNDHWM = 1000
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Supervisor:
    """The loop, the ROUTER socket, discovery and signals, around the worker table
    (workers.py) and the exec path (execpath.py); built from one Config."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        if cfg.endpoint.startswith("tcp://") and cfg.auth is None and not cfg.insecure_tcp:
            raise SystemExit("warmexec: a tcp:// endpoint needs [auth] (CurveZMQ) in the config, "
                             "or --insecure-tcp")
        self.cfg = cfg
        self.loop = Loop()
        self.metrics = metrics
        self.hooks = Hooks(self.loop, cfg.hooks, metrics, load_python_hooks(cfg.hooks.get("python", [])),
                           emit=self.emit)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE)
        # Per client: replies it has not read, requests we have not read. Past SNDHWM a
        # reply to a client that stopped reading is dropped and counted (REPLY_DROPPED).
        # A client may keep up to max_inflight execs in flight, so the mark is that high;
        # in bytes, a client's unread replies are bounded by sending.py's budget.
        self.router.setsockopt(zmq.SNDHWM, SNDHWM)
        self.router.setsockopt(zmq.RCVHWM, 1000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises: count it
        self.router.setsockopt(zmq.LINGER, 0)
        self.auth = Auth(cfg.auth, cfg.acl) if cfg.auth else None
        if self.auth is not None:
            self.auth.secure(self.ctx, self.router)
        self.endpoint = bind(self.router, cfg.endpoint)
        # The metrics thread's probes (exporter.py): an exec like any other, counted and
        # bounded by the same limits, with no key to hold (only this process can connect).
        self.loopback = self.ctx.socket(zmq.ROUTER)
        self.loopback.setsockopt(zmq.LINGER, 0)
        self.loopback_endpoint = f"inproc://warmexec-loopback-{id(self):x}"
        self.loopback.bind(self.loopback_endpoint)
        self.sender = Sender(self.loop, self.router, self.loopback, self.count_error)
        self.on_close: list[Callable[[], None]] = []  # before the context ends: the metrics server
        self.watcher = inotify.Watcher()
        self.events = Events(self.ctx, cfg.events, metrics, cfg.insecure_tcp) if cfg.events else None
        self.table = WorkerTable(self.loop, self.emit, metrics)
        self.execs = ExecPath(self.loop, self.table, self.reply, metrics, self.hooks,
                              self.events.publish if self.events else None,
                              cfg.max_inflight, cfg.max_inflight_per_container, self.sender.event)
        self.table.execs = self.execs
        self.scheduler = Scheduler(self.loop, cfg.probes, self.table, self.execs.submit, metrics, self.emit,
                                   self.hooks, cfg.max_probes_inflight, cfg.docker_healthchecks)
        if self.events is not None:
            self.loop.add(self.events.fd(), self.events.drain_subscriptions)
        self.docker_names = DockerNames(cfg.docker_host, cfg.docker_healthchecks) if cfg.docker_host else None
        if self.docker_names is not None:
            self.loop.add(self.docker_names.fd, self._on_docker_names)
        if metrics is not None:
            metrics.watch(lambda: list(self.table.containers.values()))
        self.loop.add(self.router.getsockopt(zmq.FD), self._on_router)
        self.loop.add(self.loopback.getsockopt(zmq.FD), self._on_loopback)
        self._loopback_due = True
        self.loop.add(self.watcher.fd, self._on_inotify)
        self.stopping = False
        self.backlog = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.loop.add(self._wake_r, self._on_signal)

    def emit(self, topic: str, **fields: Any) -> None:
        """One internal event: the log, the metrics and the event stream all see it."""
        log.info(topic, extra={"fields": fields})
        if self.metrics is not None:
            self.metrics.event(topic, fields)
        if self.events is not None:
            self.events.publish(topic, fields)

    def count_error(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.error(code)

    # ---- lifecycle -------------------------------------------------------------
    def serve_forever(self) -> None:
        old = signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # handlers only record: the wakeup fd
        try:
            self._periodic_rescan()
            self.scheduler.start()
            while not self.stopping or self.execs.active:
                self.loop.run_once(0 if self.backlog else 1.0)
                self._on_router(0)
                if self.stopping and time.monotonic() > self._grace_end:
                    break
        finally:
            signal.set_wakeup_fd(old)
            self.close()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking requests; in-flight execs may finish for up to grace seconds."""
        if not self.stopping:
            self.stopping = True
            self.scheduler.stop()
            self._grace_end = time.monotonic() + grace
            log.info("shutting down, %d execs in flight", self.execs.active)

    def _on_signal(self, _mask: int) -> None:
        data = os.read(self._wake_r, 64)
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
            self.shutdown()

    def close(self) -> None:
        for fn in self.on_close:
            fn()
        self.table.close()
        self.hooks.close()
        self.watcher.close()
        self.router.close(linger=0)
        self.loopback.close(linger=0)
        if self.events is not None:
            self.events.close()
        if self.auth is not None:
            self.auth.close()
        self.ctx.term()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _on_docker_names(self, _mask: int) -> None:
        containers = self.docker_names.drain()
        if containers is not None:
            self.table.names.set_docker(containers)

    # ---- discovery -------------------------------------------------------------
    def rescan(self) -> None:
        """List every root; watch what is new; add and drop containers."""
        seen: dict[str, tuple[str, str]] = {}
        try:
            for root in discovery.expand_roots(self.cfg.runc_roots):
                self.watcher.watch(root, inotify.ROOT_EVENTS)
                for cid, directory in discovery.scan(root).items():
                    if cid not in self.table.containers:  # watched before its state is read
                        self.watcher.watch(directory, inotify.DIR_EVENTS)
                    seen.setdefault(cid, (root, directory))
        except discovery.DiscoveryError as exc:
            log.error("rescan skipped, containers kept as they are: %s", exc)
            return
        self.table.sync_discovered(seen)
        # A served container's directory is not watched: its end is seen through its
        # init's pidfd, its deletion or a new one of its id in its root's events (a
        # runtime starts no new init under an existing state directory), and every `runc
        # exec` into it (docker exec, ctr exec, the kubelet's probes) writes and deletes
        # a file there, which would wake the loop for nothing. Once it is let go of, the
        # next rescan watches its directory again, if it is still there.
        for cid, (_, directory) in seen.items():
            if cid in self.table.containers:
                self.watcher.unwatch(directory)

    def _periodic_rescan(self) -> None:
        """A safety net under inotify (and what finds roots created later)."""
        self.rescan()
        if not self.stopping:
            self.loop.call_at(time.monotonic() + self.cfg.scan_interval, self._periodic_rescan)

    def _on_inotify(self, _mask: int) -> None:
        events = self.watcher.drain()
        if events and not self.stopping and inotify.needs_rescan(events, self.table.serving,
                                                                            discovery.STATE_FILES):
            self.rescan()

    # ---- the wire --------------------------------------------------------------
    def _on_router(self, _mask: int) -> None:
        """Serve up to BATCH requests from each socket, then let the loop serve workers
        too: a flood from one client must not starve everyone else's replies.
        ``self.backlog`` tells the loop not to sleep while requests are left (ZMQ_FD is
        edge-triggered)."""
        left = self._drain(self.router, ())
        if self._loopback_due or self.sender.loopback_used:  # asked only when it may have news:
            self.sender.loopback_used = False               # its fd fired, or we sent on it
            self._loopback_due = self._drain(self.loopback, (LOOPBACK,))
        self.backlog = left or self._loopback_due

    def _on_loopback(self, mask: int) -> None:
        self._loopback_due = True
        self._on_router(mask)

    def _drain(self, sock: zmq.Socket, head: tuple[bytes, ...]) -> bool:
        """Serve up to BATCH requests from sock; True if some may be left."""
        for _ in range(BATCH):
            # Asked first: an empty recv would raise, and pyzmq's exceptions are dear.
            if not sock.getsockopt(EVENTS) & POLLIN:
                return False
            try:
                frames = sock.recv_multipart(NOBLOCK, copy=self.auth is None or bool(head))
            except zmq.Again:
                return False
            if len(frames) > MAX_FRAMES or sum(len(f) for f in frames[:-1]) > MAX_ENVELOPE:
                self.count_error(errors.BAD_REQUEST)  # echoed, it would cost us twice
                continue
            if self.auth is None or head:
                self.handle([*head, *frames[:-1]], frames[-1], EVERYTHING)
            else:
                rules = self.auth.rules_for(frames[-1].get("User-Id"))  # the CURVE key, via ZAP
                self.handle([f.bytes for f in frames[:-1]], frames[-1].bytes, rules)
        return True

    def handle(self, envelope: list[bytes], payload: bytes, rules: Rules) -> None:
        req_id = None
        if self.metrics is not None:
            self.metrics.request(len(payload))
        try:
            req = codec.unpack_map(payload)
            req_id = messages.echoable_id(req)  # before any reply: an id too large is not echoed
            req_id, op = messages.check_envelope(req)
            if self.stopping:
                raise WarmexecError(errors.SHUTTING_DOWN, "supervisor is shutting down")
            if op in ("attach", "detach"):
                rules.check_admin(op)
            if op == "exec":
                exec_req = messages.parse_exec(req)
                exec_req.container = self.table.canonical(exec_req.container)  # access is by id
                rules.check_exec(exec_req)
                self.execs.submit(envelope, req_id, exec_req)
            elif op in streams.STREAM_OPS:
                answer = self.execs.stream_request(envelope, req_id, streams.parse_stream(op, req),
                                                   rules.check_exec)
                if answer is not None:
                    self.reply(envelope, answer)
            elif op == "ping":
                self.reply(envelope, messages.ok_reply(req_id, pid=os.getpid()))
            elif op == "probes":
                rows = [r for r in self.scheduler.describe() if rules.may_see(r["container"])]
                self.reply(envelope, messages.ok_reply(req_id, probes=rows))
            elif op == "list":
                rows = [r for r in self.table.describe() if rules.may_see(r["id"])]
                self.reply(envelope, messages.ok_reply(req_id, containers=rows))
            elif op == "attach":
                name, pid = messages.parse_attach(req)
                self.table.attach(name, pid)
                self.reply(envelope, messages.ok_reply(req_id))
            elif op == "detach":
                self.table.detach(messages.parse_detach(req))
                self.reply(envelope, messages.ok_reply(req_id))
        except codec.ProtocolError as exc:
            self.count_error(exc.code)
            self.reply(envelope, messages.error_reply(req_id, exc.code, exc.message))
        except WarmexecError as exc:
            self.count_error(exc.code)
            self.reply(envelope, messages.error_reply(req_id, exc.code, exc.message))
        except Exception:
            log.exception("internal error handling a request")
            self.count_error(errors.INTERNAL)
            self.reply(envelope, messages.error_reply(req_id, errors.INTERNAL, "internal error"))

    def reply(self, envelope: list[bytes], msg: dict) -> None:
        if envelope and envelope[0] is SCHEDULED:
            return self.scheduler.on_reply(msg)  # a scheduled probe's: nothing to send
        self.sender.reply(envelope, msg)
