"""One exec in flight: its pipes, captured output, timings and the reply it becomes.

The supervisor makes the exec's stdio itself: pipes whose child ends go to the
spawner with the request (SCM_RIGHTS) and whose read ends the supervisor polls. So
output never passes through the worker, and capture limits are enforced where the
memory would be spent. Output past the limit is read and dropped (``truncated``), so a
flood neither grows the supervisor nor blocks the command.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time
from typing import Any

from ..protocol.messages import ExecRequest
from . import status

_READ = 65536
_ids = itertools.count(1)


class Stream:
    __slots__ = ("buf", "fd", "limit", "total")

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.limit = limit
        self.total = 0

    def read(self, budget: int = 1 << 30) -> bool:
        """Read what is there (up to budget bytes); True once at end of stream."""
        while budget > 0:
            try:
                chunk = os.read(self.fd, _READ)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return True
            if not chunk:
                return True
            budget -= len(chunk)
            self.total += len(chunk)
            room = self.limit - len(self.buf)
            if room > 0:
                self.buf += chunk[:room]
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Exec:
    def __init__(self, envelope: list[bytes], req_id: Any, req: ExecRequest) -> None:
        self.exec_id = next(_ids)
        self.envelope = envelope
        self.req_id = req_id
        self.req = req
        self.received = time.monotonic()
        self.dispatched: float | None = None
        self.started: float | None = None
        self.deadline = None if req.timeout is None else self.received + req.timeout
        self.streams: list[Stream] = []
        self.stdin_fd = -1
        self.stdin_left = b""
        self.spawner: Any = None
        self.pid: int | None = None
        self.container_pid: int | None = None
        self.pidfd = -1
        self.timed_out = False
        self.done = False

    def open_stdio(self, devnull_r: int, devnull_w: int) -> list[int]:
        """Create the pipes; return the child's ends [stdin, stdout, stderr]."""
        child = []
        if self.req.stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(w, False)
            self.stdin_fd, self.stdin_left = w, self.req.stdin
            child.append(r)
        else:
            child.append(devnull_r)
        for _ in range(2):
            if self.req.capture:
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)  # only our end: the command's stays blocking
                self.streams.append(Stream(r, self.req.capture))
                child.append(w)
            else:
                child.append(devnull_w)
        return child

    def write_stdin(self) -> bool:
        """Feed stdin; True once it is all written (or the reader is gone)."""
        try:
            n = os.write(self.stdin_fd, self.stdin_left)
            self.stdin_left = self.stdin_left[n:]
        except BlockingIOError:
            return False
        except OSError:  # EPIPE: the command does not read its stdin
            self.stdin_left = b""
        return not self.stdin_left

    def close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def kill_group(self) -> None:
        """SIGKILL the exec's process group, if its leader was never reaped."""
        if self.pidfd < 0 or self.pid is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, 0)  # ESRCH once it has been reaped
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        self.close_stdin()
        for s in self.streams:
            s.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def timings(self, end: float) -> dict:
        def us(t: float | None) -> int | None:
            return None if t is None else int((t - self.received) * 1e6)
        return {"queued": us(self.dispatched), "spawn": us(self.started), "total": us(end)}

    def result(self, wait_status: int, rusage: dict, oom_killed: bool) -> dict:
        """Fields of the ok reply, output drained to what the exited command wrote."""
        for s in self.streams:
            s.read(budget=1 << 20)  # a lingering grandchild cannot keep us here
        out = self.streams[0] if self.streams else None
        err = self.streams[1] if self.streams else None
        now = time.monotonic()
        return {
            **status.decode(wait_status),
            "pid": self.pid, "container_pid": self.container_pid,
            "stdout": bytes(out.buf) if out else b"", "stderr": bytes(err.buf) if err else b"",
            "truncated": any(s.total > s.limit for s in self.streams),
            "timed_out": self.timed_out, "oom_killed": oom_killed,
            "rusage": rusage, "timings": self.timings(now),
        }
