"""A streamed exec, the client's side (``Client.stream``); the wire is protocol/streams.py.

    with Client() as c:
        s = c.stream("web1", ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"])
        for kind, *rest in s.events():       # ("started", exec_id, pid), ("output", 1, b"1\\n"), ...
            print(kind, rest)                # ("exit", reply) last
        print(s.result["exit_code"])

Credit goes back as events are taken: an application that stops taking them stops the
supervisor (and the command, once its pipe is full). A heartbeat goes every HEARTBEAT
seconds while the stream is used; one left untouched for its grace is killed.
``run`` moves a file descriptor's bytes to the command's stdin and its output to two
sinks in one loop, with both windows kept.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from . import errors
from .errors import WarmexecError
from .streams import HEARTBEAT, STDIN_WINDOW

if TYPE_CHECKING:
    from .client import Client

STDIN_CHUNK = 256 << 10  # bytes per stdin request


class ExecStream:
    def __init__(self, client: Client, req_id: int, window: int) -> None:
        self.client = client
        self.id = req_id
        self.window = window
        self.inbox: deque[dict] = client._streams[req_id]
        self.exec_id: int | None = None
        self.pid: int | None = None
        self.result: dict | None = None  # the exit event, once it came
        self.owed = 0  # credit taken and not yet given back
        self.last_sent = time.monotonic()
        self.stdin: dict[int, int] = {}  # stdin request id -> bytes, unanswered
        self.stdin_closed = False
        self.detached = False

    # ---- events ----------------------------------------------------------------------
    def next_event(self, timeout: float | None = None) -> tuple | None:
        """The next event: ("started", exec_id, pid), ("output", stream, data) or
        ("exit", reply); None after timeout. An error reply raises WarmexecError."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.inbox:
            if self.result is not None:
                return None
            now = time.monotonic()
            if end is not None and now >= end:
                return None
            self._tick()
            wait = HEARTBEAT if end is None else min(HEARTBEAT, end - now)
            self.client._wait_any(wait)
        return self._take(self.inbox.popleft())

    def events(self) -> Iterator[tuple]:
        while self.result is None:
            event = self.next_event()
            if event is not None:
                yield event
                if event[0] == "started" and self.detached:
                    return

    def _take(self, msg: dict) -> tuple:
        if not msg.get("ok"):
            self._end()
            err = msg.get("error") or {}
            raise WarmexecError(err.get("code", errors.INTERNAL), err.get("message", ""))
        kind = msg.get("event")
        if kind == "output":
            self.owed += len(msg["data"])
            self._tick()
            return ("output", msg["stream"], msg["data"])
        if kind == "exit":
            self.result = msg
            self._end()
            return ("exit", msg)
        if kind in ("started", "attached"):
            self.exec_id, self.pid = msg["exec_id"], msg.get("pid", self.pid)
            return (kind, self.exec_id, self.pid)
        return (kind or "unknown", msg)

    def _tick(self) -> None:
        """Give back credit past a quarter of the window, and beat the heart."""
        now = time.monotonic()
        if self.exec_id is None or self.result is not None:
            return
        if self.owed >= max(1, self.window // 4) or now - self.last_sent >= HEARTBEAT:
            self._notify("credit", bytes=self.owed)
            self.owed = 0

    def _notify(self, op: str, **fields: Any) -> None:
        self.client.notify(op, exec_id=self.exec_id, **fields)
        self.last_sent = time.monotonic()

    def _end(self) -> None:
        self.client._streams.pop(self.id, None)

    # ---- stdin and control -----------------------------------------------------------
    def stdin_room(self) -> int:
        for rid in [r for r in self.stdin if r in self.client._replies]:
            reply = self.client._replies.pop(rid)
            self.client._pending.discard(rid)
            del self.stdin[rid]
            if not reply.get("ok"):
                err = reply.get("error") or {}
                raise WarmexecError(err.get("code", errors.INTERNAL), err.get("message", ""))
            self.stdin_closed |= bool(reply.get("closed"))
        return STDIN_WINDOW - sum(self.stdin.values())

    def send_stdin(self, data: bytes, eof: bool = False) -> None:
        """Send data (within stdin_room()) to the command's stdin; eof closes it after."""
        rid = self.client.submit("stdin", exec_id=self.exec_id, data=data, eof=eof or None)
        self.stdin[rid] = len(data)
        self.last_sent = time.monotonic()
        self.stdin_closed |= eof

    def write(self, data: bytes, eof: bool = False) -> None:
        """Send all of data, waiting for room (events meanwhile are kept for next_event)."""
        view = memoryview(data)
        while view or eof:
            room = self.stdin_room()
            if self.stdin_closed:
                return
            if room < min(len(view), STDIN_CHUNK):
                self.client._wait_any(HEARTBEAT)
                self._tick()
                continue
            part = bytes(view[:STDIN_CHUNK])
            view = view[len(part):]
            self.send_stdin(part, eof and not view)
            if not view:
                return

    def resize(self, rows: int, cols: int) -> None:
        self.client.call("resize", exec_id=self.exec_id, rows=rows, cols=cols)

    def signal(self, sig: int | str, group: bool = False) -> None:
        self.client.call("signal", exec_id=self.exec_id, signal=sig, group=group or None)

    def leave(self) -> None:
        """Detach: the exec runs on; ``Client.reattach(exec_id)`` takes it up again."""
        self.client.call("leave", exec_id=self.exec_id)
        self.detached = True
        self._end()

    # ---- one loop for all of it ------------------------------------------------------
    def run(self, stdin: int | None = None, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
            on_input: Callable[[bytes], bytes | None] | None = None,
            wake: tuple[int, Callable[[], None]] | None = None) -> dict | None:
        """Feed fd stdin (if any) to the command and write its output to stdout and
        stderr until it exits; return the exit event (None if on_input detached:
        on_input sees each read of stdin and returns what to send, or None to leave).
        wake: (fd, callback), the callback called on every turn, the fd waited on too."""
        sinks = {1: stdout, 2: stderr}
        pending = b""
        eof = stdin is None or self.stdin_closed
        while self.result is None:
            if wake is not None:
                wake[1]()
            while self.inbox:
                event = self._take(self.inbox.popleft())
                if event[0] == "output" and sinks[event[1]] is not None:
                    sinks[event[1]].write(event[2])
                    sinks[event[1]].flush()
            if self.result is not None:
                break
            want_input = not eof and not pending and self.exec_id is not None and self.stdin_room() > 0
            if want_input:
                ready, _, _ = select.select([stdin], [], [], 0)
                if ready:
                    pending = os.read(stdin, STDIN_CHUNK)
                    if not pending:
                        self.send_stdin(b"", eof=True)
                        eof = True
                    elif on_input is not None:
                        pending = on_input(pending)
                        if pending is None:
                            self.leave()
                            return None
            if pending and self.stdin_room() >= len(pending):
                self.send_stdin(pending)
                pending = b""
            self._tick()
            if not self.inbox and self.result is None:
                self.client._wait_any(0.05 if pending or (not eof and not want_input) else HEARTBEAT,
                                      ([stdin] if want_input else []) + ([wake[0]] if wake else []))
        return self.result
