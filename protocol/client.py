"""Python client for warmexec (the only module of this package that uses pyzmq).

    from warmexec.protocol import Client
    with Client() as c:
        r = c.exec("web1", ["cat", "/etc/hostname"])
        print(r["exit_code"], r["stdout"])

A DEALER socket, so many requests can be in flight (``submit`` + ``result``). A client
never waits forever: while a reply is outstanding it pings the supervisor, and raises
``UNREACHABLE`` when the supervisor stops answering; a request larger than the
supervisor accepts (``codec.MAX_MESSAGE``, 4 MiB) is refused before it is sent.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any

import zmq
import zmq.auth

from . import codec, errors
from .errors import WarmexecError
from .messages import VERSION
from .stream_client import ExecStream
from .streams import DEFAULT_WINDOW

DEFAULT_ENDPOINT = "ipc:///run/warmexec/warmexec.sock"
LIVENESS = 5.0  # seconds without a reply before the supervisor is pinged
REPLY_MARGIN = 30.0  # beyond an exec's own timeout
#: The largest reply read: two streams captured up to 16 MiB each and the rest of the map
#: (requests are held to codec.MAX_MESSAGE; replies come from the supervisor).
MAX_REPLY = (32 << 20) + (64 << 10)


def too_large(size: int | str) -> str:
    return f"request of {size} bytes exceeds the {codec.MAX_MESSAGE >> 20} MiB limit"


def default_endpoint() -> str:
    return os.environ.get("WARMEXEC_ENDPOINT") or DEFAULT_ENDPOINT


class Client:
    def __init__(self, endpoint: str | None = None, context: zmq.Context | None = None,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        """server_key: the server's public key file; client_key: our key_secret file
        (both as ``warmexec keygen`` writes them), for a CurveZMQ endpoint."""
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A DEALER with no connected peer (supervisor down, or our key refused) blocks
        # on send: never forever.
        self.sock.setsockopt(zmq.SNDTIMEO, int(LIVENESS * 1000))
        if server_key or client_key:
            self.sock.curve_serverkey, _ = zmq.auth.load_certificate(server_key)
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.auth.load_certificate(client_key)
        self.sock.connect(endpoint or default_endpoint())
        self._poller = zmq.Poller()  # one for the client's life, not one per reply
        self._poller.register(self.sock, zmq.POLLIN)
        self._ids = itertools.count(1)
        self._replies: dict[Any, dict] = {}
        self._pending: set[Any] = set()  # submitted, reply not yet taken or given up
        self._streams: dict[Any, deque] = {}  # a streamed exec's request id -> its messages

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(linger=0)

    # ---- requests ----------------------------------------------------------------
    def submit(self, op: str, _stream: bool = False, **fields: Any) -> int:
        """Send a request; return its id. A request over the supervisor's frame limit is
        refused here: ZeroMQ would drop it unanswered (and cut the connection).
        _stream: its replies are a stream's messages (stream_client.py)."""
        req_id = next(self._ids)
        if _stream:
            self._streams[req_id] = deque()
        msg = {"v": VERSION, "id": req_id, "op": op}
        msg.update({k: v for k, v in fields.items() if v is not None})
        data = codec.pack(msg)
        if len(data) > codec.MAX_MESSAGE:
            raise WarmexecError(errors.BAD_REQUEST, too_large(len(data)))
        try:
            self.sock.send(data)
        except zmq.Again:
            raise WarmexecError(errors.UNREACHABLE, "cannot reach the supervisor (is it running, "
                                                    "and is our key authorised?)") from None
        self._pending.add(req_id)
        return req_id

    def result(self, req_id: int, timeout: float | None = None) -> dict:
        """The reply to req_id; raises WarmexecError for an error reply."""
        reply = self._wait(req_id, timeout)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise WarmexecError(err.get("code", errors.INTERNAL), err.get("message", ""))
        return reply

    def call(self, op: str, timeout: float | None = 10.0, **fields: Any) -> dict:
        return self.result(self.submit(op, **fields), timeout)

    def exec(self, container: str, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, timeout: float | None = None,
             stdin: bytes | None = None, capture: int | None = None,
             privileged: bool | None = None) -> dict:
        rid = self.submit("exec", container=container, argv=list(argv), env=env, cwd=cwd,
                          user=user, timeout=timeout, stdin=stdin, capture=capture,
                          privileged=privileged)
        # With a timeout, the supervisor answers by timeout + its kill grace: wait a
        # margin more, never forever. Without one, wait while the supervisor lives.
        return self.result(rid, None if timeout is None else timeout + REPLY_MARGIN)

    def stream(self, container: str, argv: list[str], *, env: dict[str, str] | None = None,
               cwd: str | None = None, user: str | None = None, timeout: float | None = None,
               privileged: bool | None = None, interactive: bool = False, tty: bool = False,
               rows: int | None = None, cols: int | None = None, detach: bool = False,
               window: int = DEFAULT_WINDOW, grace: float | None = None) -> ExecStream:
        """Start a streamed exec (protocol/streams.py); its events come from the
        ExecStream. detach: the first event ("started") is the last."""
        rid = self.submit("exec", container=container, argv=list(argv), env=env, cwd=cwd, user=user,
                          timeout=timeout, privileged=privileged, stream=True,
                          interactive=interactive or None, tty=tty or None, rows=rows, cols=cols,
                          detach=detach or None, window=window, grace=grace, _stream=True)
        s = ExecStream(self, rid, window)
        s.detached = detach
        return s

    def reattach(self, exec_id: int, window: int = DEFAULT_WINDOW) -> ExecStream:
        """Take up a detached exec's stream (its output from now on, and its exit)."""
        rid = self.submit("reattach", exec_id=exec_id, window=window, _stream=True)
        s = ExecStream(self, rid, window)
        s.exec_id = exec_id
        return s

    def inspect(self, exec_id: int) -> dict:
        return self.call("inspect", exec_id=exec_id)

    def kill(self, exec_id: int, sig: int | str = "KILL", group: bool = False) -> dict:
        return self.call("signal", exec_id=exec_id, signal=sig, group=group or None)

    def notify(self, op: str, **fields: Any) -> None:
        """A request no reply is expected to (a stream's credit and heartbeat)."""
        msg = {"v": VERSION, "id": None, "op": op}
        msg.update({k: v for k, v in fields.items() if v is not None})
        try:
            self.sock.send(codec.pack(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the heartbeat after it says the same

    def ping(self, timeout: float = 5.0) -> dict:
        return self.call("ping", timeout)

    def list(self) -> list[dict]:
        return self.call("list")["containers"]

    def attach(self, name: str, pid: int) -> dict:
        return self.call("attach", container=name, pid=pid)

    def detach(self, name: str) -> dict:
        return self.call("detach", container=name)

    # ---- receiving ---------------------------------------------------------------
    def _recv(self, wait: float) -> dict | None:
        # A poller, not a receive timeout: pyzmq restarts a timed-out recv interrupted by
        # a signal with its whole timeout, a poll with what is left of it.
        if not self._poller.poll(int(wait * 1000)):
            return None
        try:
            data = self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        msg = codec.unpack_map(data, MAX_REPLY)
        queue = self._streams.get(msg.get("id"))
        if queue is not None:
            queue.append(msg)
        elif msg.get("id") in self._pending:  # a reply we stopped waiting for is dropped
            self._replies[msg.get("id")] = msg
        return msg

    def _wait_any(self, wait: float, fds: list[int] = ()) -> None:
        """Wait up to wait seconds for messages (taking all there are) or for one of
        fds to turn readable."""
        if fds:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            for fd in fds:
                poller.register(fd, zmq.POLLIN)
            if not poller.poll(int(wait * 1000)):
                return
        elif self._recv(wait) is None:
            return
        while self._recv(0) is not None:
            pass

    def _wait(self, req_id: Any, timeout: float | None) -> dict:
        end = None if timeout is None else time.monotonic() + timeout
        probe: int | None = None
        probe_sent = 0.0
        while req_id not in self._replies:
            now = time.monotonic()
            if end is not None and now >= end:
                self._pending.discard(req_id)
                raise WarmexecError(errors.TIMEOUT, f"no reply within {timeout}s")
            wait = LIVENESS if end is None else min(LIVENESS, end - now)
            if self._recv(wait) is not None:
                if probe is not None and self._replies.pop(probe, None) is not None:
                    self._pending.discard(probe)
                    probe = None
                continue
            if probe is None:
                probe, probe_sent = self.submit("ping"), time.monotonic()
            elif time.monotonic() - probe_sent >= LIVENESS:
                self._pending.difference_update((req_id, probe))
                raise WarmexecError(errors.UNREACHABLE, "the supervisor is not answering")
        if probe is not None:  # its answer, if it comes, is dropped
            self._pending.discard(probe)
            self._replies.pop(probe, None)
        self._pending.discard(req_id)
        return self._replies.pop(req_id)
