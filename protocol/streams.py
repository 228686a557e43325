"""Wire schema v1, streamed execs: their options, the requests that steer them, their events.

An ``exec`` with ``stream: true`` is answered by several messages, all with the exec
request's ``id``, in this order::

    {ok: true, event: "started", exec_id, pid, container_pid}
    {ok: true, event: "output", exec_id, stream: 1|2, seq, data}       ... as written
    {ok: true, event: "exit", exec_id, exit_code, ...}                  the one-shot reply's fields

(or, at any point, one error reply ``{ok: false, error}``, which ends it too). ``seq``
counts the exec's output chunks from 0 across stdout and stderr: it is the order the
supervisor read them in. The client steers it with requests naming the ``exec_id``:

* ``credit {exec_id, bytes}``: lets the supervisor send ``bytes`` more of output
  (``bytes: 0`` is a heartbeat). Unanswered unless it is bad.
* ``stdin {exec_id, data, eof}``: answered ``{ok, written, closed}`` once its data is
  in the command's stdin pipe; the client keeps at most ``STDIN_WINDOW`` bytes of
  stdin unanswered.
* ``resize {exec_id, rows, cols}``, ``signal {exec_id, signal, group}``,
  ``inspect {exec_id}``, ``leave {exec_id}`` (detach: the exec runs on),
  ``reattach {exec_id, window}`` (its events come to this request's id from now on).

Only the protocol lives here (stdlib and the codec's types); the supervisor's side is
supervisor/streams.py, the clients' protocol/client.py.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from typing import Any

from .fields import bad as _bad
from .fields import optional as _field

STREAM_OPS = ("credit", "stdin", "resize", "signal", "inspect", "leave", "reattach")

DEFAULT_WINDOW = 1 << 20  # bytes of output a client lets the supervisor send ahead
MAX_WINDOW = 4 << 20  # per exec: what one stream may have queued towards its client
STDIN_WINDOW = 1 << 20  # bytes of stdin a client may send ahead of the answers
MAX_STDIN_CHUNK = 1 << 20
DEFAULT_GRACE = 10.0  # seconds a client may be silent before its exec is killed
MAX_GRACE = 24 * 3600.0
HEARTBEAT = 1.0  # seconds between a client's heartbeats (credit 0), well under any grace


@dataclass
class StreamOptions:
    interactive: bool = False  # stdin streamed (stdin requests)
    tty: bool = False
    rows: int = 24
    cols: int = 80
    detach: bool = False  # answered once started; output read and dropped until reattached
    window: int = DEFAULT_WINDOW
    grace: float = DEFAULT_GRACE






def _int(req: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = _field(req, key, int, default)
    if value is None or not lo <= value <= hi:
        raise _bad(f"{key} must be an integer in [{lo}, {hi}]")
    return value


def parse_options(req: dict) -> StreamOptions | None:
    """The streaming part of an exec request; None for a one-shot exec."""
    if not _field(req, "stream", bool, False):
        for key in ("interactive", "tty", "detach"):
            if _field(req, key, bool, False):
                raise _bad(f"{key} needs stream: true")
        return None
    if req.get("stdin") is not None:
        raise _bad("a streamed exec takes its stdin as stdin requests")
    opts = StreamOptions(
        interactive=_field(req, "interactive", bool, False), tty=_field(req, "tty", bool, False),
        rows=_int(req, "rows", 1, 65535, 24), cols=_int(req, "cols", 1, 65535, 80),
        detach=_field(req, "detach", bool, False),
        window=_int(req, "window", 0, MAX_WINDOW, DEFAULT_WINDOW),
        grace=float(_field(req, "grace", (int, float), DEFAULT_GRACE)))
    if not 0 < opts.grace <= MAX_GRACE:
        raise _bad(f"grace must be in (0, {MAX_GRACE:.0f}] seconds")
    return opts


@dataclass
class StreamRequest:
    op: str
    exec_id: int
    bytes: int = 0  # credit
    data: bytes = b""  # stdin
    eof: bool = False
    rows: int = 0
    cols: int = 0
    signal: int = 0
    group: bool = False
    window: int = DEFAULT_WINDOW


def parse_signal(value: Any) -> int:
    """A signal number, or a name as kill(1) takes it (KILL, SIGKILL)."""
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(_signal.Signals, name, None) if name.isalnum() else None
        if number is None:
            raise _bad(f"unknown signal {value!r}")
        return int(number)
    if type(value) is not int or not 1 <= value <= 64:
        raise _bad("signal must be a name or a number in [1, 64]")
    return value


def parse_stream(op: str, req: dict) -> StreamRequest:
    exec_id = req.get("exec_id")
    if type(exec_id) is not int or exec_id <= 0:
        raise _bad("exec_id must be a positive integer")
    out = StreamRequest(op, exec_id)
    if op == "credit":
        out.bytes = _int(req, "bytes", 0, MAX_WINDOW, 0)
    elif op == "stdin":
        out.data = _field(req, "data", bytes, b"")
        if len(out.data) > MAX_STDIN_CHUNK:
            raise _bad(f"stdin data is larger than {MAX_STDIN_CHUNK} bytes")
        out.eof = _field(req, "eof", bool, False)
    elif op == "resize":
        out.rows, out.cols = _int(req, "rows", 1, 65535), _int(req, "cols", 1, 65535)
    elif op == "signal":
        out.signal = parse_signal(req.get("signal", "KILL"))
        out.group = _field(req, "group", bool, False)
    elif op == "reattach":
        out.window = _int(req, "window", 0, MAX_WINDOW, DEFAULT_WINDOW)
    return out


# ---- events: what a streamed exec's client receives ----------------------------------
def started(req_id: Any, exec_id: int, pid: int | None, container_pid: int | None) -> dict:
    return {"v": 1, "id": req_id, "ok": True, "event": "started", "exec_id": exec_id, "pid": pid,
            "container_pid": container_pid}


def output(req_id: Any, exec_id: int, stream: int, seq: int, data: bytes) -> dict:
    return {"v": 1, "id": req_id, "ok": True, "event": "output", "exec_id": exec_id, "stream": stream,
            "seq": seq, "data": data}
