"""The supervisor's event loop: ZeroMQ in, workers out, one thread.

Everything is an fd in one epoll set: the ROUTER socket (through ZMQ_FD, which is
edge-triggered: the loop does not sleep while requests are left), the zygote's socket,
each worker's socketpair, stdin pipes, each container init's pidfd, inotify and the
event socket. Timers (exec deadlines, worker backoff, discovery rescans) live in a heap.
Nothing blocks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from ..protocol import codec, errors, ipc, messages
from ..protocol.errors import WarmexecError
from . import discovery, inotify
from .auth import EVERYTHING, Auth, Rules
from .dispatch import Dispatcher, ZygoteLost
from .endpoints import bind
from .events import Events
from .hooks import Hooks

log = logging.getLogger("warmexec")

BATCH = 64  # requests served per turn of the loop
MAX_FRAMES = 8  # identities (proxies add one each), the REQ delimiter, payload
MAX_ENVELOPE = 4096  # bytes of all of them but the payload
REPLY_DROPPED = "REPLY_DROPPED"  # a metrics label, never a reply
SNDHWM = 1000
SMALL_REPLY = 4 << 10  # bytes: a reply up to this is copied into zmq, bounded by SNDHWM alone
REPLY_BUDGET = 8 << 20  # bytes of larger replies zmq may hold for one client
TRACKED_COST = 1 << 10  # what the ledger charges a large reply beyond its bytes (its tracker)
FLUSH_INTERVAL = 0.01  # seconds between sends of replies waiting for room
SWEEP_INTERVAL = 1.0  # seconds: how soon the ledger forgets clients that went away
SENT, WAITING, DROPPED = "sent", "waiting", "dropped"  # what became of a large reply
# Plain ints: each use of pyzmq's flag enums builds an Enum object, on every message.
NOBLOCK = int(zmq.NOBLOCK)
MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Timer:
    """A pending ``Loop.call_at``. ``cancel()`` drops the callback at once, and with it
    everything the callback holds (an exec's request, stdin and output): a timer that
    only waited for its deadline kept a finished exec alive until then."""

    __slots__ = ("fn", "_loop")

    def __init__(self, loop: Loop, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn
        self._loop = loop

    def cancel(self) -> None:
        """Idempotent; a no-op once the timer has fired."""
        if self.fn is not None:
            self.fn = None
            self._loop._cancelled_one()


class Loop:
    """epoll + a timer heap. Handlers are called with the epoll event mask.

    A cancelled timer leaves an empty entry in the heap (removing it from the middle of
    a heap is O(n)): when such entries are most of the heap, it is rebuilt without
    them, so the heap stays within twice the live timers (plus COMPACT_MIN)."""

    COMPACT_MIN = 256

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # entries of self.timers whose Timer was cancelled
        self._seq = itertools.count()
        self.running = True

    def add(self, fd: int, handler: Callable[[int], None], mask: int = select.EPOLLIN) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self, fn)
        heapq.heappush(self.timers, (when, next(self._seq), timer))
        return timer

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > self.COMPACT_MIN and 2 * self._cancelled > len(self.timers):
            self.timers = [entry for entry in self.timers if entry[2].fn is not None]
            heapq.heapify(self.timers)
            self._cancelled = 0

    def _next_due(self) -> float | None:
        """The deadline of the first live timer (cancelled ones at the top are dropped)."""
        timers = self.timers
        while timers and timers[0][2].fn is None:
            heapq.heappop(timers)
            self._cancelled -= 1
        return timers[0][0] if timers else None

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        due = self._next_due()
        while due is not None and due <= now:
            timer = heapq.heappop(self.timers)[2]
            fn, timer.fn = timer.fn, None  # fired: a later cancel() is a no-op
            self._call(fn)
            due = self._next_due()
        wait = max_wait if due is None else min(max_wait, max(0.0, due - now))
        try:
            events = self.epoll.poll(wait)
        except InterruptedError:
            return
        for fd, mask in events:
            handler = self.handlers.get(fd)
            if handler is not None:
                self._call(handler, mask)

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """One handler's bug must not take the supervisor (and every client) down."""
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in %r", fn)


class _Peer:
    """One client's large replies: those zmq holds (in the order it writes them) and
    those waiting for room."""

    __slots__ = ("held", "sent", "waiting", "waiting_bytes")

    def __init__(self) -> None:
        self.held = 0
        self.sent: deque[tuple[int, zmq.MessageTracker]] = deque()
        self.waiting: deque[tuple[list[bytes], bytes, int]] = deque()
        self.waiting_bytes = 0


class ReplyBudget:
    """Large replies, bounded in bytes per client: REPLY_BUDGET in ZeroMQ's queues, as
    much again waiting here for room; past both a reply is dropped (and the caller counts
    it REPLY_DROPPED).

    A ROUTER bounds what it queues for a peer in messages (SNDHWM), not bytes, and says
    nothing of how much of it the peer has taken. So a reply over SMALL_REPLY is sent
    zero-copy with a pyzmq MessageTracker: libzmq holds our own bytes object instead of a
    copy and lets go of it once it has written its last byte into the client's connection
    (or dropped it with the connection), when pyzmq's garbage-collector thread marks the
    tracker done. The ledger is thus exact about what a client pins, not an estimate;
    zmq writes one peer's messages in order, so they are released in order.

    A client that reads keeps its ledger near zero (its zmq I/O thread empties the
    connection even while its application is busy, up to its own RCVHWM), but the
    tracker is marked done by a Python thread, which waits for the GIL while the loop is
    busy: in a burst the ledger lags behind zmq. The waiting queue absorbs that lag
    (``flush`` sends what fits, every FLUSH_INTERVAL while anything waits) instead of
    dropping replies a reading client would have taken. A client that stops reading fills
    both, and what it is sent after that is dropped.

    What one client (one connection: ZeroMQ's peer) can pin in all: SNDHWM small
    replies, each at most SMALL_REPLY plus its envelope (MAX_ENVELOPE), and twice
    REPLY_BUDGET of large ones with their trackers: about 24 MiB. A client with many
    connections has as many budgets: the IPC endpoint is root's alone, a TCP one needs an
    authorised key.
    """

    def __init__(self, send: Callable[[list[bytes], bytes], zmq.MessageTracker | None],
                 budget: int = REPLY_BUDGET) -> None:
        self.send = send  # sends one reply tracked; None if it could not be sent
        self.budget = budget
        self.peers: dict[bytes, _Peer] = {}

    def offer(self, envelope: list[bytes], data: bytes) -> str:
        """Send now (SENT), or queue until there is room (WAITING), or DROPPED: no room."""
        key = envelope[0]
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = _Peer()
        size = len(data) + sum(map(len, envelope)) + TRACKED_COST
        if not peer.waiting and self._fits(peer, size):
            self._send(peer, envelope, data, size)
            outcome = SENT
        elif peer.waiting_bytes + size <= self.budget:
            peer.waiting.append((envelope, data, size))
            peer.waiting_bytes += size
            outcome = WAITING
        else:
            outcome = DROPPED
        self._forget_if_empty(key, peer)
        return outcome

    def flush(self) -> float | None:
        """Release what zmq let go of, send what now fits, forget clients with nothing
        left (a client that went away is never offered a reply again). Return the
        seconds until the next flush is due, or None when nothing is held."""
        for key, peer in list(self.peers.items()):
            self._release(peer)
            while peer.waiting and self._fits(peer, peer.waiting[0][2]):
                envelope, data, size = peer.waiting.popleft()
                peer.waiting_bytes -= size
                self._send(peer, envelope, data, size)
            self._forget_if_empty(key, peer)
        if any(peer.waiting for peer in self.peers.values()):
            return FLUSH_INTERVAL
        return SWEEP_INTERVAL if self.peers else None

    def _fits(self, peer: _Peer, size: int) -> bool:
        """One reply always fits, however large; the rest within the budget."""
        self._release(peer)
        return peer.held == 0 or peer.held + size <= self.budget

    def _release(self, peer: _Peer) -> None:
        while peer.sent and peer.sent[0][1].done:
            peer.held -= peer.sent.popleft()[0]

    def _send(self, peer: _Peer, envelope: list[bytes], data: bytes, size: int) -> None:
        tracker = self.send(envelope, data)
        if tracker is not None:
            peer.sent.append((size, tracker))
            peer.held += size

    def _forget_if_empty(self, key: bytes, peer: _Peer) -> None:
        if not peer.sent and not peer.waiting:
            self.peers.pop(key, None)


class Zygote:
    """The fresh interpreter every worker is forked from (see warmexec.worker.zygote)."""

    def __init__(self) -> None:
        ours, theirs = ipc.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmexec.worker.zygote", str(os.getpid()), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            env=zygote_env(), start_new_session=True)  # no terminal, no group of ours
        theirs.close()
        self.sock = ours

    def fork(self, tag: Any, seccomp: dict | None) -> None:
        """Ask for a joiner. Only the seccomp profile goes through the zygote (it compiles
        each once); the container's spec goes to the joiner alone, over its own socket,
        so that no worker's memory, copied from the zygote's, holds another container's."""
        ipc.send(self.sock, {"op": "fork", "tag": tag, "seccomp": seccomp})

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def zygote_env() -> dict[str, str]:
    """Workers need none of the supervisor's environment (its secrets least of all)."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL")
    return {k: os.environ[k] for k in keep if k in os.environ}


class Supervisor:
    def __init__(self, endpoint: str, roots: list[str], metrics: Any = None, hooks: dict | None = None,
                 python_hooks: list[Any] = (), scan_interval: float = 2.0, max_inflight: int = 1024,
                 max_inflight_per_container: int = 256, auth: Auth | None = None,
                 insecure_tcp: bool = False, events: str | None = None) -> None:
        if endpoint.startswith("tcp://") and auth is None and not insecure_tcp:
            raise SystemExit("warmexec: a tcp:// endpoint needs [auth] (CurveZMQ) in the config, "
                             "or --insecure-tcp")
        self.loop = Loop()
        self.metrics = metrics
        self.hooks = Hooks(self.loop, hooks or {}, metrics, python_hooks)
        self.zygote = Zygote()  # before any ZeroMQ context exists
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE)
        # Per client: replies it has not read, requests we have not read. Past SNDHWM a
        # reply to a client that stopped reading is dropped and counted (REPLY_DROPPED).
        # A client may keep up to max_inflight execs in flight, so the mark is that high;
        # in bytes, a client's unread replies are bounded by self.budget (ReplyBudget).
        self.router.setsockopt(zmq.SNDHWM, SNDHWM)
        self.router.setsockopt(zmq.RCVHWM, 1000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises: count it
        self.router.setsockopt(zmq.LINGER, 0)
        self.budget = ReplyBudget(self._send_tracked)
        self._flush: tuple[float, Timer] | None = None  # the next flush of self.budget
        self.auth = auth
        if auth is not None:
            auth.secure(self.ctx, self.router)
        self.endpoint = bind(self.router, endpoint)
        self.roots_patterns = roots
        self.scan_interval = scan_interval
        self.watcher = inotify.Watcher()
        self.events = Events(self.ctx, events, metrics, insecure_tcp) if events else None
        self.dispatch = Dispatcher(self.loop, self.zygote, self.reply, metrics, self.hooks,
                                   max_inflight, max_inflight_per_container,
                                   self.events.publish if self.events else None)
        if self.events is not None:
            self.loop.add(self.events.fd(), self.events.drain_subscriptions)
        self.hooks.emit = self.dispatch.emit
        if metrics is not None:
            metrics.watch(lambda: list(self.dispatch.containers.values()))
        self.loop.add(self.router.getsockopt(zmq.FD), self._on_router)
        self.loop.add(self.zygote.sock.fileno(), self._on_zygote)
        self.loop.add(self.watcher.fd, self._on_inotify)
        self.stopping = False
        self.backlog = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.loop.add(self._wake_r, self._on_signal)

    # ---- lifecycle -------------------------------------------------------------
    def serve_forever(self) -> None:
        old = signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # handlers only record: the wakeup fd
        try:
            self._periodic_rescan()
            while not self.stopping or self.dispatch.total_inflight():
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
            self._grace_end = time.monotonic() + grace
            log.info("shutting down, %d execs in flight", self.dispatch.total_inflight())

    def _on_signal(self, _mask: int) -> None:
        data = os.read(self._wake_r, 64)
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
            self.shutdown()

    def close(self) -> None:
        self.dispatch.close()
        self.hooks.close()
        self.watcher.close()
        self.router.close(linger=0)
        if self.events is not None:
            self.events.close()
        if self.auth is not None:
            self.auth.close()
        self.ctx.term()
        self.zygote.close()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _on_zygote(self, _mask: int) -> None:
        try:
            self.dispatch.on_zygote()
        except ZygoteLost:
            log.error("the zygote died (exit %s); starting a new one", self.zygote.proc.poll())
            self.loop.remove(self.zygote.sock.fileno())
            self.zygote.close()
            self.zygote = Zygote()
            self.loop.add(self.zygote.sock.fileno(), self._on_zygote)
            self.dispatch.zygote_replaced(self.zygote)

    # ---- discovery -------------------------------------------------------------
    def rescan(self) -> None:
        """List every root; watch what is new; add and drop containers."""
        seen: dict[str, tuple[str, str]] = {}
        try:
            for root in discovery.expand_roots(self.roots_patterns):
                self.watcher.watch(root, inotify.ROOT_EVENTS)
                for cid, directory in discovery.scan(root).items():
                    self.watcher.watch(directory, inotify.DIR_EVENTS)
                    seen.setdefault(cid, (root, directory))
        except discovery.DiscoveryError as exc:
            log.error("rescan skipped, containers kept as they are: %s", exc)
            return
        self.dispatch.sync_discovered(seen)

    def _periodic_rescan(self) -> None:
        """A safety net under inotify (and what finds roots created later)."""
        self.rescan()
        if not self.stopping:
            self.loop.call_at(time.monotonic() + self.scan_interval, self._periodic_rescan)

    def _on_inotify(self, _mask: int) -> None:
        if self.watcher.drain() and not self.stopping:
            self.rescan()

    # ---- the wire --------------------------------------------------------------
    def _on_router(self, _mask: int) -> None:
        """Serve up to BATCH requests, then let the loop serve workers too: a flood from
        one client must not starve everyone else's replies. ``self.backlog`` tells the
        loop not to sleep while requests are left (ZMQ_FD is edge-triggered)."""
        for _ in range(BATCH):
            # Asked first: an empty recv would raise, and pyzmq's exceptions are dear.
            if not self.router.getsockopt(EVENTS) & POLLIN:
                self.backlog = False
                return
            try:
                frames = self.router.recv_multipart(NOBLOCK, copy=self.auth is None)
            except zmq.Again:
                self.backlog = False
                return
            if len(frames) > MAX_FRAMES or sum(len(f) for f in frames[:-1]) > MAX_ENVELOPE:
                self.dispatch.count_error(errors.BAD_REQUEST)  # echoed, it would cost us twice
                continue
            if self.auth is None:
                self.handle(frames[:-1], frames[-1], EVERYTHING)
            else:
                rules = self.auth.rules_for(frames[-1].get("User-Id"))  # the CURVE key, via ZAP
                self.handle([f.bytes for f in frames[:-1]], frames[-1].bytes, rules)
        self.backlog = True

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
                rules.check_exec(exec_req)
                self.dispatch.submit(envelope, req_id, exec_req)
            elif op == "ping":
                self.reply(envelope, messages.ok_reply(req_id, pid=os.getpid()))
            elif op == "list":
                rows = [r for r in self.dispatch.describe() if rules.may_see(r["id"])]
                self.reply(envelope, messages.ok_reply(req_id, containers=rows))
            elif op == "attach":
                name, pid = messages.parse_attach(req)
                self.dispatch.attach(name, pid)
                self.reply(envelope, messages.ok_reply(req_id))
            elif op == "detach":
                self.dispatch.detach(messages.parse_detach(req))
                self.reply(envelope, messages.ok_reply(req_id))
        except codec.ProtocolError as exc:
            self.dispatch.count_error(exc.code)
            self.reply(envelope, messages.error_reply(req_id, exc.code, exc.message))
        except WarmexecError as exc:
            self.dispatch.count_error(exc.code)
            self.reply(envelope, messages.error_reply(req_id, exc.code, exc.message))
        except Exception:
            log.exception("internal error handling a request")
            self.dispatch.count_error(errors.INTERNAL)
            self.reply(envelope, messages.error_reply(req_id, errors.INTERNAL, "internal error"))

    def reply(self, envelope: list[bytes], msg: dict) -> None:
        data = codec.pack(msg)
        if len(data) > SMALL_REPLY:
            return self._reply_large(envelope, data)
        send = self.router.send
        try:
            for frame in envelope:  # the first one (the client's identity) routes it all
                send(frame, MORE)
            send(data, NOBLOCK)
        except zmq.Again:
            self.dispatch.count_error(REPLY_DROPPED)
        except zmq.ZMQError as exc:  # client gone, unroutable
            log.debug("reply dropped: %s", exc)

    def _reply_large(self, envelope: list[bytes], data: bytes) -> None:
        """Zero-copy and tracked, within the client's byte budget (ReplyBudget)."""
        outcome = self.budget.offer(envelope, data)
        if outcome == DROPPED:
            self.dispatch.count_error(REPLY_DROPPED)
        self._flush_within(SWEEP_INTERVAL if outcome == SENT else FLUSH_INTERVAL)

    def _send_tracked(self, envelope: list[bytes], data: bytes) -> zmq.MessageTracker | None:
        send = self.router.send
        try:
            for frame in envelope:
                send(frame, MORE)
            return send(zmq.Frame(data, track=True, copy=False), NOBLOCK, copy=False, track=True)
        except zmq.Again:
            self.dispatch.count_error(REPLY_DROPPED)
        except zmq.ZMQError as exc:
            log.debug("reply dropped: %s", exc)
        return None

    def _flush_within(self, interval: float) -> None:
        """One flush timer, at most interval from now (a later one is replaced)."""
        when = time.monotonic() + interval
        if self._flush is not None:
            if self._flush[0] <= when:
                return
            self._flush[1].cancel()
        self._flush = (when, self.loop.call_at(when, self._on_flush))

    def _on_flush(self) -> None:
        self._flush = None
        interval = self.budget.flush()
        if interval is not None:
            self._flush_within(interval)
