"""The supervisor's side of the zygote: its process, its protocol and its replacement.

The zygote (warmexec.worker.zygote) forks every worker's joiner. ``fork`` sends it a
tagged request; its reply, a ``forked`` with the joiner's socket and a pidfd on the
joiner, comes back to ``on_forked(tag, Forked)``. If the zygote dies, each request it
had not answered comes back as a failed Forked and a new zygote takes over at once:
workers already forked live on (they are in their containers, not its children).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import internal, ipc
from .loop import Loop

log = logging.getLogger("warmexec")


@dataclass(frozen=True)
class Forked:
    """A joiner, or why there is none (sock is None)."""

    sock: socket.socket | None = None
    pid: int = 0
    pidfd: int = -1
    error: str = ""


class Zygote:
    def __init__(self, loop: Loop, on_forked: Callable[[int, Forked], None]) -> None:
        self.loop = loop
        self.on_forked = on_forked
        self.tags = itertools.count(1)
        self.pending: set[int] = set()  # tags asked and not answered
        self._start()

    def _start(self) -> None:
        ours, theirs = ipc.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmexec.worker.zygote", str(os.getpid()), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            env=zygote_env(), start_new_session=True)  # no terminal, no group of ours
        theirs.close()
        self.sock = ours
        self.loop.add(ours.fileno(), self._on_readable)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fork(self, seccomp: dict | None) -> int:
        """Ask for a joiner; return the tag its Forked will carry. Only the seccomp
        profile goes through the zygote (it compiles each once); the container's spec
        goes to the joiner alone, over its own socket, so that no worker's memory,
        copied from the zygote's, holds another container's."""
        tag = next(self.tags)
        self.pending.add(tag)
        try:
            ipc.send(self.sock, internal.fork(tag, seccomp))
        except OSError:
            pass  # it died: its EOF is read next and answers this tag
        return tag

    def _on_readable(self, _mask: int) -> None:
        msg, fds = ipc.recv(self.sock)
        if msg is None:
            return self._replace()
        try:
            internal.check(msg, frozenset((internal.FORKED,)))
        except internal.BadMessage as exc:
            log.error("the zygote sent a malformed message: %s", exc)
            msg = {"tag": msg.get("tag"), "error": str(exc)}
        tag = msg["tag"]
        if tag not in self.pending or len(fds) != 2:
            for fd in fds:
                os.close(fd)  # nobody waits for it: the joiner sees EOF and exits
            if tag in self.pending:
                self.pending.discard(tag)
                self.on_forked(tag, Forked(error=f"fork failed: {msg.get('error')}"))
            return
        self.pending.discard(tag)
        self.on_forked(tag, Forked(socket.socket(fileno=fds[0]), msg["pid"], fds[1]))

    def _replace(self) -> None:
        log.error("the zygote died (exit %s); starting a new one", self.proc.poll())
        self._stop()
        self._start()
        pending, self.pending = self.pending, set()
        for tag in sorted(pending):
            self.on_forked(tag, Forked(error="zygote died"))

    def _stop(self) -> None:
        self.loop.remove(self.sock.fileno())
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self._stop()


def zygote_env() -> dict[str, str]:
    """Workers need none of the supervisor's environment (its secrets least of all)."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL")
    return {k: os.environ[k] for k in keep if k in os.environ}
