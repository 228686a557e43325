"""One exec in flight: its request, stdin, collected output, timings and reply.

The worker owns the command's output pipes and sends what it kept (up to
``capture`` bytes of each stream) with the exit status, in chunks when it is large;
the supervisor keeps no more than ``capture`` of each whatever the worker sends, and
passes a descriptor only for stdin, when there is input.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from ..protocol.messages import ExecRequest
from . import status

if TYPE_CHECKING:
    from .handles import Worker
    from .loop import Timer
    from .streams import Stream

_ids = itertools.count(1)
PIDFD_SIGNAL_PROCESS_GROUP = 4


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
        self.output = (bytearray(), bytearray())  # chunks sent ahead of the exit
        self.stdin_fd = -1
        self.stdin_left = b""
        self.worker: Worker | None = None  # the one it was sent to
        self.pid: int | None = None
        self.container_pid: int | None = None
        self.pidfd = -1
        self.timed_out = False
        self.done = False
        self.timers: list[Timer] = []  # the loop's timers for it, cancelled when it ends
        self.stream: Stream | None = None  # a streamed exec's pipes and client (streams.py)

    def open_stdin(self) -> list[int]:
        """A pipe for the request's input; return the command's end ([] without input)."""
        if not self.req.stdin:
            return []
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        self.stdin_fd, self.stdin_left = w, self.req.stdin
        return [r]

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
        if self.pidfd >= 0 and self.pid is not None:
            kill_group(self.pidfd, self.pid)

    def close(self) -> None:
        self.close_stdin()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def timings(self, end: float) -> dict:
        def us(t: float | None) -> int | None:
            return None if t is None else int((t - self.received) * 1e6)
        return {"queued": us(self.dispatched), "spawn": us(self.started), "total": us(end)}

    def result(self, msg: dict) -> dict:
        """Fields of the ok reply, from the worker's exit message (checked against its
        schema: the worker is the container's, and may say anything of its types)."""
        capture = self.req.capture
        out, err = (bytes(self.output[i]) + msg[k] for i, k in ((0, "stdout"), (1, "stderr")))
        return {
            **status.decode(msg["status"] & 0xFFFF),
            "pid": self.pid, "container_pid": self.container_pid,
            "stdout": out[:capture], "stderr": err[:capture],
            "truncated": msg["stdout_total"] > capture or msg["stderr_total"] > capture,
            "timed_out": self.timed_out, "oom_killed": False,
            "rusage": {"utime": msg["utime"], "stime": msg["stime"], "maxrss_kb": msg["maxrss"]},
            "timings": self.timings(time.monotonic()),
        }


def kill_group(pidfd: int, pid: int) -> None:
    """SIGKILL a command's process group (it leads its own) through its pidfd: the
    kernel resolves the group of that very process, no pid number involved (Linux 6.9);
    on older kernels, by the group's number once the pidfd says its leader is still the
    process we started."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL, None, PIDFD_SIGNAL_PROCESS_GROUP)
    except (ProcessLookupError, PermissionError):
        pass
    except OSError:  # EINVAL: a kernel without the flag
        try:
            signal.pidfd_send_signal(pidfd, 0)  # ESRCH once it has exited
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
