"""``warmexec exec -t`` / ``-it``: the local terminal's side of an exec with a terminal.

The terminal itself is in the container (worker/terminal.py); here the local one is
set raw for ``-i`` (every key, Ctrl-C too, goes to the command's terminal, whose line
discipline acts on it) and always restored: in a ``finally``, and on SIGTERM, SIGHUP,
SIGINT or SIGQUIT, whose handlers only record the signal and wake the loop, which then
unwinds through that ``finally`` (exit 128+N; the exec, its client gone, is killed
after its grace). The window size goes with the exec request and again on every
SIGWINCH. ``--detach-keys`` (docker's syntax, default ctrl-p,ctrl-q) leaves the exec
running and exits 0; ``warmexec inspect`` and ``Client.reattach`` find it again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager

from ..protocol.client import Client
from ..protocol.errors import BAD_REQUEST, WarmexecError

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_CTRL_PUNCT = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}


def parse_keys(spec: str) -> bytes:
    """docker's --detach-keys: comma-separated keys, each a single character or
    ctrl-X with X a letter or one of @ [ \\ ] ^ _."""
    out = bytearray()
    for key in spec.split(","):
        low = key.lower()
        if len(key) == 1:
            out.append(ord(key))
        elif low.startswith("ctrl-") and len(key) == 6 and (low[5].isalpha() and low[5].isascii()):
            out.append(ord(low[5]) - ord("a") + 1)
        elif low.startswith("ctrl-") and len(key) == 6 and key[5] in _CTRL_PUNCT:
            out.append(_CTRL_PUNCT[key[5]])
        else:
            raise WarmexecError(BAD_REQUEST, f"invalid detach keys {spec!r}: unknown character {key!r}")
    return bytes(out)


class DetachKeys:
    """Watches input for the sequence: bytes that may begin it are held back until
    the next byte says whether it is the sequence (then None: detach) or not."""

    def __init__(self, keys: bytes) -> None:
        self.keys, self.held = keys, b""

    def feed(self, data: bytes) -> bytes | None:
        out = bytearray()
        for byte in data:
            candidate = self.held + bytes((byte,))
            if self.keys and self.keys.startswith(candidate):
                if candidate == self.keys:
                    return None
                self.held = candidate
            else:
                out += candidate
                self.held = b""
        return bytes(out)


class Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def window_size() -> tuple[int | None, int | None]:
    for fd in (1, 0):
        try:
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
        except OSError:
            continue
    return None, None


@contextmanager
def local_terminal(raw: bool) -> Iterator[list[int]]:
    """Our stdin raw (if raw), signals recorded: yields the list the handlers append to;
    the wakeup pipe's read end is its first item. Everything restored on the way out."""
    saved = termios.tcgetattr(0) if raw else None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    seen: list[int] = [r]
    handled = (signal.SIGWINCH, *STOP_SIGNALS)
    old = {s: signal.signal(s, lambda signum, _f: seen.append(signum)) for s in handled}
    old_wakeup = signal.set_wakeup_fd(w)
    try:
        if raw:
            tty.setraw(0, termios.TCSANOW)
        yield seen
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(r)
        os.close(w)


def run_tty(c: Client, args: argparse.Namespace, command: list[str], env: dict[str, str]) -> int:
    if args.interactive and not os.isatty(0):
        raise WarmexecError(BAD_REQUEST, "the input device is not a TTY")
    keys = DetachKeys(parse_keys(args.detach_keys or DEFAULT_DETACH_KEYS))
    rows, cols = window_size()
    s = c.stream(args.container, command, env=env or None, cwd=args.workdir, user=args.user,
                 timeout=args.timeout, privileged=args.privileged or None, interactive=args.interactive,
                 tty=True, rows=rows, cols=cols, detach=args.detach)
    if args.detach:
        for _ in s.events():
            pass
        print(f"{s.exec_id} {s.pid}")
        return 0
    try:
        with local_terminal(raw=args.interactive) as seen:
            def woken() -> None:  # every turn of the loop: cheap when nothing came
                try:
                    os.read(seen[0], 256)
                except BlockingIOError:
                    pass
                for signum in seen[1:]:
                    if signum in STOP_SIGNALS:
                        raise Stopped(signum)
                if signal.SIGWINCH in seen[1:] and s.exec_id is not None:  # else: once started
                    del seen[1:]
                    size = window_size()
                    if size[0] is not None:
                        s.resize(*size)
            result = s.run(0 if args.interactive else None, sys.stdout.buffer, sys.stderr.buffer,
                           on_input=keys.feed, wake=(seen[0], woken))
    except Stopped as stop:
        return 128 + stop.signum
    if result is None:
        print(f"warmexec: detached from exec {s.exec_id} (warmexec inspect {s.exec_id})", file=sys.stderr)
        return 0
    if result.get("timed_out"):
        print(f"warmexec: timed out after {args.timeout}s", file=sys.stderr)
    return result["exit_code"]
