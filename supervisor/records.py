"""What ``inspect`` says of streamed and detached execs: running ones, and finished ones
for a bounded time and number (as ``docker exec inspect``, which keeps them until the
container goes). One-shot execs are not recorded: their reply says it all."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..protocol import errors, messages
from ..protocol.errors import WarmexecError
from ..protocol.messages import ExecRequest

if TYPE_CHECKING:
    from .execs import Exec

KEEP = 1000  # finished records at most
KEEP_FOR = 3600.0  # seconds a finished record is kept
ARGV_KEPT = 4 << 10  # characters of a recorded argv (a request's may be megabytes)


class Records:
    def __init__(self, keep: int = KEEP, keep_for: float = KEEP_FOR) -> None:
        self.keep, self.keep_for = keep, keep_for
        self.running: dict[int, tuple[Exec, float]] = {}  # exec id -> (exec, wall-clock start)
        # oldest first: (when, what inspect says, what its access is checked against)
        self.done: OrderedDict[int, tuple[float, dict, ExecRequest]] = OrderedDict()

    def started(self, ex: Exec) -> None:
        self.running[ex.exec_id] = (ex, time.time())

    def finished_exec(self, ex: Exec, reply: dict) -> None:
        ex_start = self.running.pop(ex.exec_id, (ex, None))[1]
        now = time.time()
        doc = _describe(ex, ex_start)
        doc.update(running=False, ended_at=now)
        if reply.get("ok"):
            doc.update({k: reply.get(k) for k in ("exit_code", "signal", "timed_out", "oom_killed")})
        else:
            doc.update(exit_code=None, error=reply["error"])
        access = ExecRequest(container=ex.req.container, argv=[], user=ex.req.user,
                             privileged=ex.req.privileged)
        self.done[ex.exec_id] = (time.monotonic(), doc, access)
        self._trim()

    def finished(self, exec_id: int) -> bool:
        return exec_id in self.done

    def request(self, exec_id: int) -> ExecRequest | None:
        """What the exec was started as (container, user, privileged): access is by it."""
        if exec_id in self.running:
            return self.running[exec_id][0].req
        found = self.done.get(exec_id)
        return found[2] if found else None

    def inspect(self, req_id: Any, exec_id: int) -> dict:
        self._trim()
        if exec_id in self.running:
            ex, start = self.running[exec_id]
            return messages.ok_reply(req_id, **_describe(ex, start), running=True, ended_at=None,
                                     exit_code=None)
        if exec_id in self.done:
            return messages.ok_reply(req_id, **self.done[exec_id][1])
        raise WarmexecError(errors.NO_SUCH_EXEC, f"no exec {exec_id} (finished records are kept "
                                                 f"{self.keep_for:g}s, at most {self.keep})")

    def _trim(self) -> None:
        old = time.monotonic() - self.keep_for
        while self.done and (len(self.done) > self.keep or next(iter(self.done.values()))[0] < old):
            self.done.popitem(last=False)


def _bounded(argv: list[str]) -> tuple[list[str], bool]:
    """argv's first ARGV_KEPT characters (whole arguments, the last one cut); truncated?"""
    kept, left = [], ARGV_KEPT
    for arg in argv:
        if len(arg) > left:
            kept.append(arg[:left])
            return kept, True
        kept.append(arg)
        left -= len(arg)
    return kept, False


def _describe(ex: Exec, started_at: float | None) -> dict:
    opts = ex.req.stream
    argv, cut = _bounded(ex.req.argv)
    return {"exec_id": ex.exec_id, "container": ex.req.container, "argv": argv, "argv_truncated": cut,
            "user": ex.req.user or "", "privileged": ex.req.privileged, "pid": ex.pid,
            "container_pid": ex.container_pid, "tty": bool(opts and opts.tty),
            "interactive": bool(opts and opts.interactive), "detached": ex.stream is not None
            and not ex.stream.attached, "started_at": started_at}
