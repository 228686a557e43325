"""Start and exit hooks: never on the exec's critical path.

A *start* hook fires once an exec's pid is known (the process is already running), an
*exit* hook once its wait status is known (the reply is already sent). Each gets one
JSON document describing the exec.

* Command hooks (``[[hooks.start]] command = [...]`` in the config) run as processes
  in a new session with the document on stdin; the event loop watches each through a
  pidfd and kills its group at its timeout. At most ``MAX_RUNNING`` run at once: past
  that a hook is dropped, and counted.
* Python hooks are objects with ``start(event)`` and/or ``exit(event)`` methods,
  registered in the ``warmexec.hooks`` entry-point group (or named in the config as
  ``python = ["module:attr"]``). They run on one hook thread behind a bounded queue.

Failures, timeouts and drops are logged and counted; none reaches the client.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from importlib.metadata import entry_points
from typing import Any

from .lifecycle import Emit
from .loop import Loop
from .metrics import Metrics

log = logging.getLogger("warmexec.hooks")

MAX_RUNNING = 64
MAX_DOC = 60000  # fits a pipe buffer, so writing the document never blocks
ENTRY_POINT_GROUP = "warmexec.hooks"


def load_python_hooks(names: list[str]) -> list[Any]:
    hooks = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        hooks.append(_instantiate(ep.load()))
    for name in names:
        module, _, attr = name.partition(":")
        hooks.append(_instantiate(getattr(importlib.import_module(module), attr)))
    return hooks


def _instantiate(obj: Any) -> Any:
    return obj() if isinstance(obj, type) else obj


class Hooks:
    def __init__(self, loop: Loop, cfg: dict, metrics: Metrics | None = None, python_hooks: list[Any] = (),
                 emit: Emit | None = None) -> None:
        self.loop = loop
        self.metrics = metrics
        self.commands = {kind: list(cfg.get(kind, [])) for kind in ("start", "exit")}
        self.python = list(python_hooks)
        self.running: dict[int, tuple[subprocess.Popen, str, float]] = {}  # pidfd -> (proc, kind, t0)
        self.queue: queue.Queue = queue.Queue(maxsize=1000)
        self.emit = emit
        if self.python:
            threading.Thread(target=self._python_thread, name="warmexec-hooks", daemon=True).start()

    def wants(self, kind: str) -> bool:
        return bool(self.commands[kind] or self.python)

    def fire(self, kind: str, doc: dict) -> None:
        doc = {"event": kind, **doc, "time": time.time()}
        for hook in self.commands[kind]:
            self._run(kind, hook, doc)
        if self.python:
            try:
                self.queue.put_nowait((kind, doc))
            except queue.Full:
                self._count(kind, "dropped")

    # ---- command hooks -------------------------------------------------------------
    def run(self, kind: str, hook: dict, doc: dict) -> None:
        """One command hook ({command, timeout}) with doc on stdin (probe hooks)."""
        self._run(kind, hook, doc)

    def _run(self, kind: str, hook: dict, doc: dict) -> None:
        if len(self.running) >= MAX_RUNNING:
            return self._count(kind, "dropped")
        data = json.dumps(doc).encode()
        if len(data) > MAX_DOC:
            doc = {**doc, "argv": doc["argv"][:16], "argv_truncated": True}
            data = json.dumps(doc).encode()[:MAX_DOC]
        try:
            proc = subprocess.Popen(hook["command"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            log.warning("%s hook %s cannot start: %s", kind, hook["command"][0], exc)
            return self._count(kind, "spawn", hook["command"][0])
        try:
            os.set_blocking(proc.stdin.fileno(), False)
            proc.stdin.write(data)
            proc.stdin.close()
        except OSError:
            pass  # the hook does not read its stdin; its exit status still counts
        self._count(kind)
        pidfd = os.pidfd_open(proc.pid)
        self.running[pidfd] = (proc, kind, time.monotonic())
        self.loop.add(pidfd, lambda _m: self._reaped(pidfd))
        timeout = float(hook.get("timeout", 5))
        self.loop.call_at(time.monotonic() + timeout, lambda: self._overdue(pidfd, proc, timeout))

    def _reaped(self, pidfd: int) -> None:
        proc, kind, started = self.running.pop(pidfd)
        self.loop.remove(pidfd)
        os.close(pidfd)
        code = proc.wait()
        if self.metrics is not None:
            self.metrics.hook_duration(kind, time.monotonic() - started)
        if code != 0:
            log.warning("%s hook %s exited %s", kind, proc.args[0], code)
            self._count(kind, "timeout" if getattr(proc, "timed_out", False) else "exit_status",
                        proc.args[0])

    def _overdue(self, pidfd: int, proc: subprocess.Popen, timeout: float) -> None:
        if self.running.get(pidfd, (None,))[0] is proc:
            log.warning("hook %s still running after %ss: killed", proc.args[0], timeout)
            proc.timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _count(self, kind: str, failure: str | None = None, command: str = "") -> None:
        if self.metrics is not None:
            self.metrics.hook(kind, failure)
        if failure is not None and self.emit is not None:
            self.emit("hook.failed", kind=kind, reason=failure, command=command)

    # ---- python hooks --------------------------------------------------------------
    def _python_thread(self) -> None:
        while True:
            kind, doc = self.queue.get()
            for hook in self.python:
                fn = getattr(hook, kind, None)
                if fn is None:
                    continue
                self._count(kind)
                try:
                    fn(doc)
                except Exception:
                    log.exception("python %s hook %r failed", kind, hook)
                    if self.metrics is not None:  # not emit(): the loop's thread owns that
                        self.metrics.hook(kind, "exception")

    def close(self) -> None:
        for pidfd, (proc, _, _) in list(self.running.items()):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            self.loop.remove(pidfd)
            os.close(pidfd)
        self.running.clear()
