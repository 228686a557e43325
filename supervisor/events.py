"""The event stream: one internal event feeds the log, the metrics and this PUB socket.

``warmexec serve --events ENDPOINT`` binds an XPUB socket. Each event is two frames,
``[topic, msgpack map]``; the map holds ``v``, ``topic``, ``time`` (Unix seconds) and the
event's fields (see docs/OBSERVABILITY.md). Subscribers filter by topic prefix::

    exec.started     container, exec_id, pid, container_pid, argv, user, privileged
    exec.exited      ... plus exit_code, signal, timed_out, oom_killed, timings
    worker.state     container, old, new, reason
    container.added  container, pid, source, pod, namespace
    container.removed container, reason
    hook.failed      kind, reason, command
    probe.changed    probe, container, name, pod, namespace, status, previous, streak, last

A slow subscriber is never waited for: past the high-water mark, events are dropped
(XPUB_NODROP makes that visible) and counted in ``warmexec_events_dropped_total``.
"""

from __future__ import annotations

import time

import zmq

from ..protocol import codec
from .endpoints import bind
from .metrics import Metrics

HWM = 10000


class Events:
    def __init__(self, ctx: zmq.Context, endpoint: str, metrics: Metrics | None = None,
                 insecure_tcp: bool = False) -> None:
        if endpoint.startswith("tcp://") and not insecure_tcp:
            raise SystemExit("warmexec: the event stream carries every exec's argv: serve it on "
                             "an ipc:// endpoint, or pass --insecure-tcp")
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = bind(self.sock, endpoint)
        self.metrics = metrics

    def fd(self) -> int:
        return self.sock.getsockopt(zmq.FD)

    def drain_subscriptions(self, _mask: int = 0) -> None:
        """XPUB hands us subscribe/unsubscribe messages; we only need to consume them."""
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def publish(self, topic: str, fields: dict) -> None:
        msg = codec.pack({"v": 1, "topic": topic, "time": time.time(), **fields})
        try:
            self.sock.send_multipart([topic.encode(), msg], zmq.NOBLOCK)
        except zmq.Again:
            if self.metrics is not None:
                self.metrics.event_dropped()
        self.drain_subscriptions()

    def close(self) -> None:
        self.sock.close(linger=0)
