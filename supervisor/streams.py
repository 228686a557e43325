"""Streamed execs, the supervisor's side: output read as written, stdin fed as it comes.

A streamed exec's stdio are pipes the supervisor makes; the worker only hands them to
the command (its ``spawn`` carries ``streams``). The supervisor reads stdout and stderr
itself, in its loop, and sends each read to the client as an ``output`` event; it
writes the client's ``stdin`` requests into the stdin pipe. It never holds more than
one read per exec: it reads a pipe only while the client's credit lasts (and ZeroMQ
takes what it sends), so a client that stops reading stops the supervisor reading,
the pipe fills and the command blocks in its write. What one exec can make ZeroMQ
queue for its client is its window (at most MAX_WINDOW), what it keeps here one read
(CHUNK) and STDIN_WINDOW of stdin.

Order: ``seq`` numbers every read across both pipes. Within a stream it is exact; across
them it is the order in which the loop found data: two writes the command made with
the supervisor waking in between arrive in order, two that were both in their pipes
at one wake-up come stdout first. (One reader of two pipes can know no better: the
kernel keeps no order between pipes. docker exec copies each in its own goroutine.)

The command's exit is reported by its worker; everything it wrote is in its pipes by
then, so the exit event follows once both pipes are read empty (what a process it
left behind writes later is not waited for). A client silent for its ``grace``
(no credit, heartbeat or other request) is taken for gone: its exec is killed unless
detached. A detached exec's output is dropped until a client re-attaches, by the kernel
(spliced to /dev/null, never copied to us) and on a timer, at most DETACHED_PIPE per
pipe every DRAIN_INTERVAL: a detached flood costs its command the wait for room in its
pipe, the supervisor about twenty splices a second. After the exit each pipe is read
for at most what it held then (its size): a process the command left behind that keeps
writing is not waited for.

With ``tty`` the command's stdio is a terminal of the container's that its worker
relays (worker/terminal.py): the supervisor still holds only pipes, stdin (if
interactive) and one output pipe (stream 1: a terminal has one), and passes a
``resize`` on to the worker.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..protocol import errors, internal, messages
from ..protocol import streams as wire
from ..protocol.errors import WarmexecError
from .execs import PIDFD_SIGNAL_PROCESS_GROUP
from .records import Records

if TYPE_CHECKING:
    from .execs import Exec
    from .loop import Loop, Timer

CHUNK = 64 << 10  # bytes per read, and so per output event
RETRY, RETRY_MAX = 0.01, 0.25  # seconds before an event that could not go is offered again (doubling)
DRAIN_INTERVAL = 0.05  # seconds between drains of a detached exec's pipes
DETACHED_PIPE = 1 << 20  # bytes: a detached exec's pipes, grown (drained at most this per interval)

#: sends one message to a client: False if ZeroMQ would not take it now (try again)
Send = Callable[[list[bytes], dict], bool]


class Stream:
    """The streamed part of one exec: its pipes, its client, its credit."""

    def __init__(self, ex: Exec, envelope: list[bytes], req_id: Any) -> None:
        self.ex = ex
        self.opts: wire.StreamOptions = ex.req.stream
        self.envelope: list[bytes] | None = None if self.opts.detach else envelope
        self.req_id = req_id
        self.credit = self.opts.window
        self.seq = 0
        self.outputs: dict[int, int] = {}  # read end -> 1 (stdout) or 2 (stderr)
        self.watched: set[int] = set()  # read ends in the loop
        self.stdin_fd = -1
        self.stdin_queue: deque[tuple[list[bytes], Any, memoryview, bool, int]] = deque()
        self.stdin_bytes = 0
        self.stdin_closed = False
        self.heard = time.monotonic()
        self.pending: tuple[list[bytes], dict] | None = None  # an event ZeroMQ would not take
        self.retry = RETRY
        self.left: dict[int, int] = {}  # after the exit: bytes each pipe may still be read for
        self.drain: Timer | None = None  # detached: the next drain of its pipes
        self.started_sent = False
        self.exited = False
        self.final: Callable[[], None] | None = None  # sends the exit, once drained
        self.timer: Timer | None = None

    @property
    def attached(self) -> bool:
        return self.envelope is not None

    def drained(self) -> bool:
        return not self.outputs and self.pending is None


class Streams:
    def __init__(self, loop: Loop, send: Send, kill: Callable[[Exec, str, str], None],
                 tell: Callable[[Exec, dict], None]) -> None:
        self.loop = loop
        self.send = send
        self.kill = kill  # ends an exec with an error (its group killed): ExecPath.fail
        self.tell = tell  # a message to the exec's worker: ExecPath.tell
        self.live: dict[int, Stream] = {}  # exec id -> stream
        self.records = Records()
        self.null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # the host's: where detached output goes

    # ---- from the exec path ------------------------------------------------------------
    def open(self, ex: Exec, envelope: list[bytes], req_id: Any) -> None:
        ex.stream = self.live[ex.exec_id] = Stream(ex, envelope, req_id)
        self._arm_grace(ex.stream)

    def pipes(self, st: Stream) -> tuple[list[int], dict]:
        """The command's ends of its stdio pipes and the spawn's fields for them."""
        fds: list[int] = []
        try:
            if st.opts.interactive:
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(w, False)
                st.stdin_fd = w
                fds.append(r)
            for number in (1,) if st.opts.tty else (1, 2):
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)
                st.outputs[r] = number
                fds.append(w)
        except OSError:
            for fd in fds:
                os.close(fd)
            self.close(st)
            raise
        self._write_stdin(st)  # what came before its pipes existed
        if st.opts.tty:
            return fds, {"streams": True, "tty": True, "rows": st.opts.rows, "cols": st.opts.cols}
        return fds, {"streams": True}  # its pipes are read once it has started (its first event)

    def started(self, st: Stream) -> None:
        ex = st.ex
        self.records.started(ex)
        if st.attached or st.opts.detach:
            self._send(st, wire.started(st.req_id, ex.exec_id, ex.pid, ex.container_pid), st.envelope
                       or ex.envelope)
        st.started_sent = True
        self._pump(st)

    def exited(self, st: Stream, final: Callable[[], None]) -> None:
        """The command exited: its exit goes out (final) once its pipes are read empty."""
        st.exited, st.final = True, final
        for fd in list(st.watched):
            self._unwatch(st, fd)
        self._stop_drain(st)
        for fd in st.outputs:
            st.left[fd] = _pipe_size(fd)
        self._pump(st)

    def close(self, st: Stream) -> None:
        """The exec ended (finish): let go of everything; also of the Exec's link to us
        (the two refer to each other: kept, the pair, its request with megabytes of argv
        among it, would wait for the cyclic collector's next full pass)."""
        self.live.pop(st.ex.exec_id, None)
        st.ex.stream = None
        for fd in list(st.outputs):
            self._close_output(st, fd)
        if st.stdin_fd >= 0:
            self.loop.remove(st.stdin_fd)
            os.close(st.stdin_fd)
            st.stdin_fd = -1
        for envelope, req_id, _, _, _ in st.stdin_queue:
            self.send(envelope, _stdin_reply(req_id, 0, True))
        st.stdin_queue.clear()
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        self._stop_drain(st)

    def finished(self, st: Stream, reply: dict) -> None:
        """The exec's last message: its exit (or an error), to whoever is attached; to
        the requester of a detached exec that never started."""
        self.records.finished_exec(st.ex, reply)
        if reply["ok"]:
            reply.update(event="exit", exec_id=st.ex.exec_id)
        if st.envelope is None and not st.started_sent:
            st.envelope = st.ex.envelope
        reply["id"] = st.req_id
        self.send_final(st, reply)
        self.close(st)

    # ---- output ----------------------------------------------------------------------
    def _watch(self, st: Stream, fd: int) -> None:
        if fd not in st.watched:
            st.watched.add(fd)
            self.loop.add(fd, lambda _m: self._on_output(st, fd))

    def _unwatch(self, st: Stream, fd: int) -> None:
        if fd in st.watched:
            st.watched.discard(fd)
            self.loop.remove(fd)

    def _may_read(self, st: Stream) -> bool:
        return st.pending is None and (st.credit > 0 or not st.attached)

    def _on_output(self, st: Stream, fd: int) -> None:
        if not self._may_read(st):
            for watched in list(st.watched):
                self._unwatch(st, watched)
            return
        self._read(st, fd)

    def _read(self, st: Stream, fd: int, size: int = CHUNK) -> bool:
        """One read of fd within the credit (detached: spliced to /dev/null); False when
        it has nothing now, or nothing more is to be read of it."""
        if st.attached:
            size = min(size, st.credit)
        if st.exited:
            size = min(size, st.left[fd])
            if size <= 0:
                self._close_output(st, fd)
                return False
        try:
            if st.attached:
                data = os.read(fd, size)
                got = len(data)
            else:
                got = os.splice(fd, self.null, size, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if st.exited:
                self._close_output(st, fd)
            return False
        if not got:
            self._close_output(st, fd)
            return False
        if st.exited:
            st.left[fd] -= got
        if st.attached:
            st.credit -= got
            st.seq += 1
            self._send(st, wire.output(st.req_id, st.ex.exec_id, st.outputs[fd], st.seq - 1, data))
        return True

    def _pump(self, st: Stream) -> None:
        """Read what credit allows: before the exit through the loop, after it at once
        (a pipe a left-behind process holds open never reads as ended)."""
        if self._may_read(st):
            if st.exited:
                for fd in list(st.outputs):
                    while self._may_read(st) and self._read(st, fd):
                        pass
            elif st.attached:
                self._stop_drain(st)
                for fd in st.outputs:
                    self._watch(st, fd)
            elif st.drain is None:
                for fd in list(st.watched):
                    self._unwatch(st, fd)
                for fd in st.outputs:
                    _grow(fd)
                self._drain_detached(st)
        if st.exited and st.drained() and st.final is not None:
            final, st.final = st.final, None
            final()

    def _close_output(self, st: Stream, fd: int) -> None:
        self._unwatch(st, fd)
        if st.outputs.pop(fd, None) is not None:
            os.close(fd)

    def _drain_detached(self, st: Stream) -> None:
        """Drop what a detached exec wrote (at most a pipe's worth each), and come back."""
        st.drain = None
        if st.attached or st.exited or st.ex.done:
            return
        for fd in list(st.outputs):
            self._read(st, fd, DETACHED_PIPE)
        if st.outputs:
            st.drain = self.loop.call_at(time.monotonic() + DRAIN_INTERVAL, lambda: self._drain_detached(st))

    def _stop_drain(self, st: Stream) -> None:
        if st.drain is not None:
            st.drain.cancel()
            st.drain = None

    def _send(self, st: Stream, msg: dict, envelope: list[bytes] | None = None) -> None:
        envelope = envelope or st.envelope
        if envelope is None:
            return
        if st.pending is None and self.send(envelope, msg):
            return
        if st.pending is None:  # nothing is read until it goes
            st.pending, st.retry = (envelope, msg), RETRY
            self.loop.call_at(time.monotonic() + st.retry, lambda: self._retry(st))

    def _retry(self, st: Stream) -> None:
        if st.pending is None:
            return
        envelope, msg = st.pending
        if not self.send(envelope, msg):
            st.retry = min(st.retry * 2, RETRY_MAX)
            self.loop.call_at(time.monotonic() + st.retry, lambda: self._retry(st))
            return
        st.pending = None
        self._pump(st)

    def send_final(self, st: Stream, reply: dict) -> None:
        """The exec's last message (its exit or an error), never dropped for a full queue
        while the stream lives: offered again like any event."""
        if st.envelope is not None:
            st.pending = None
            if not self.send(st.envelope, reply):
                envelope, until = st.envelope, time.monotonic() + st.opts.grace
                self.loop.call_at(time.monotonic() + RETRY, lambda: self._final_retry(envelope, reply, until,
                                                                                     RETRY))

    def _final_retry(self, envelope: list[bytes], reply: dict, until: float, wait: float) -> None:
        """Offered again (backing off) for as long as its client may be silent and alive."""
        if not self.send(envelope, reply) and time.monotonic() < until:
            wait = min(wait * 2, RETRY_MAX)
            again = lambda: self._final_retry(envelope, reply, until, wait)  # noqa: E731
            self.loop.call_at(time.monotonic() + wait, again)

    # ---- the client ------------------------------------------------------------------
    def _arm_grace(self, st: Stream) -> None:
        st.timer = self.loop.call_at(st.heard + st.opts.grace, lambda: self._grace_over(st))

    def _grace_over(self, st: Stream) -> None:
        st.timer = None
        if st.ex.done:
            return
        if not st.attached or time.monotonic() - st.heard < st.opts.grace:
            self._arm_grace(st)
            return
        self.kill(st.ex, errors.CLIENT_GONE, f"no word from the client for {st.opts.grace:g}s")

    def request(self, envelope: list[bytes], req_id: Any, req: wire.StreamRequest) -> dict | None:
        """A client's request about a streamed exec: its reply, or None (none is due now)."""
        if req.op == "inspect":
            return self.records.inspect(req_id, req.exec_id)
        st = self.live.get(req.exec_id)
        if st is None:
            if req.op == "credit" and self.records.finished(req.exec_id):
                return None  # credit crossing the exit is no error
            raise WarmexecError(errors.NO_SUCH_EXEC, f"no running exec {req.exec_id}")
        st.heard = time.monotonic()
        if req.op == "credit":
            st.credit = min(st.credit + req.bytes, wire.MAX_WINDOW)
            self._pump(st)
            return None
        if req.op == "stdin":
            return self._stdin(st, envelope, req_id, req)
        if req.op == "signal":
            return self._signal(st, req_id, req)
        if req.op == "leave":
            st.envelope = None
            self._pump(st)
            return messages.ok_reply(req_id, exec_id=req.exec_id)
        if req.op == "reattach":
            st.envelope, st.req_id, st.credit = envelope, req_id, req.window
            st.ex.envelope = envelope
            self._pump(st)
            return messages.ok_reply(req_id, event="attached", exec_id=req.exec_id)
        return self._resize(st, req_id, req)

    def _resize(self, st: Stream, req_id: Any, req: wire.StreamRequest) -> dict:
        if not st.opts.tty:
            raise WarmexecError(errors.BAD_REQUEST, f"resize: exec {req.exec_id} has no terminal")
        st.opts.rows, st.opts.cols = req.rows, req.cols  # the spawn's, if it is not sent yet
        if st.ex.worker is not None:
            self.tell(st.ex, internal.resize(st.ex.exec_id, req.rows, req.cols))
        return messages.ok_reply(req_id, exec_id=req.exec_id)

    def request_of(self, exec_id: int) -> messages.ExecRequest | None:
        """The request a running or recorded exec was started with (its access is by it)."""
        st = self.live.get(exec_id)
        return st.ex.req if st is not None else self.records.request(exec_id)

    def _signal(self, st: Stream, req_id: Any, req: wire.StreamRequest) -> dict:
        """Through the command's pidfd (its group: the one it leads), never by a pid
        number alone."""
        ex = st.ex
        if ex.pidfd < 0 or ex.pid is None:
            raise WarmexecError(errors.NO_SUCH_EXEC, f"exec {ex.exec_id} has not started")
        try:
            if req.group:
                try:
                    signal.pidfd_send_signal(ex.pidfd, req.signal, None, PIDFD_SIGNAL_PROCESS_GROUP)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # a kernel without the flag (before 6.9)
                        raise
                    signal.pidfd_send_signal(ex.pidfd, 0)  # still the process we started
                    os.killpg(ex.pid, req.signal)
            else:
                signal.pidfd_send_signal(ex.pidfd, req.signal)
        except ProcessLookupError:
            pass  # exited meanwhile: its exit is on its way
        return messages.ok_reply(req_id, exec_id=ex.exec_id)

    # ---- stdin -----------------------------------------------------------------------
    def _stdin(self, st: Stream, envelope: list[bytes], req_id: Any, req: wire.StreamRequest) -> dict | None:
        if not st.opts.interactive:
            raise WarmexecError(errors.BAD_REQUEST, f"exec {req.exec_id} was not started interactive")
        if st.stdin_closed:
            return _stdin_reply(req_id, 0, True)
        if st.stdin_bytes + len(req.data) > wire.STDIN_WINDOW:
            raise WarmexecError(errors.BAD_REQUEST,
                                f"more than {wire.STDIN_WINDOW} bytes of stdin unanswered")
        st.stdin_queue.append((envelope, req_id, memoryview(req.data), req.eof, len(req.data)))
        st.stdin_bytes += len(req.data)
        self._write_stdin(st)
        return None

    def _write_stdin(self, st: Stream) -> None:
        if st.stdin_fd < 0:
            return  # its pipes are made when it goes to its worker: written then
        while st.stdin_queue:
            envelope, req_id, data, eof, size = st.stdin_queue[0]
            try:
                while data:
                    data = data[os.write(st.stdin_fd, data):]
            except BlockingIOError:
                st.stdin_queue[0] = (envelope, req_id, data, eof, size)
                if st.stdin_fd not in self.loop.handlers:
                    self.loop.add(st.stdin_fd, lambda _m: self._write_stdin(st), select.EPOLLOUT)
                return
            except OSError:  # EPIPE: the command closed its stdin
                return self._stdin_gone(st)
            st.stdin_queue.popleft()
            st.stdin_bytes -= size
            if eof:
                self._stdin_gone(st, (envelope, req_id, size))
                return
            self.send(envelope, _stdin_reply(req_id, size, False))
        self.loop.remove(st.stdin_fd)

    def _stdin_gone(self, st: Stream, last: tuple | None = None) -> None:
        """EOF asked for, or the command stopped reading: close; answer what waits."""
        self.loop.remove(st.stdin_fd)
        os.close(st.stdin_fd)
        st.stdin_fd, st.stdin_closed = -1, True
        if last is not None:
            self.send(last[0], _stdin_reply(last[1], last[2], True))
        for envelope, req_id, _, _, _ in st.stdin_queue:
            self.send(envelope, _stdin_reply(req_id, 0, True))
        st.stdin_queue.clear()
        st.stdin_bytes = 0


def _stdin_reply(req_id: Any, written: int, closed: bool) -> dict:
    return messages.ok_reply(req_id, written=written, closed=closed)



def _pipe_size(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        return CHUNK


def _grow(fd: int) -> None:
    """A detached exec's pipe holds DETACHED_PIPE (its pages are its writer's, charged to
    the container), so that it is drained that much at a time; its size where refused."""
    try:
        if _pipe_size(fd) < DETACHED_PIPE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, DETACHED_PIPE)
    except OSError:
        pass
