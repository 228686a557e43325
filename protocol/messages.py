"""Wire schema v1: request validation and reply construction.

Frame layout (see docs/PROTOCOL.md)::

    client (DEALER)            supervisor (ROUTER)
    [payload]          ->      [identity][payload]
    client (REQ)
    [""][payload]      ->      [identity][""][payload]

``payload`` is one msgpack map. Requests carry ``v`` (=1), a client-chosen ``id``
(echoed in the reply, so bounded: at most MAX_ID bytes) and ``op``. Every reply carries
``v``, ``id`` and ``ok``; a failed request is ``{ok: false, error: {code, message}}``
with a code from :mod:`warmexec.protocol.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import codec, errors
from .errors import WarmexecError
from .fields import bad as _bad
from .fields import optional as _optional
from .streams import STREAM_OPS, StreamOptions, parse_options

VERSION = 1
OPS = ("exec", "ping", "list", "attach", "detach", "probes", *STREAM_OPS)

DEFAULT_CAPTURE = 64 * 1024
MAX_CAPTURE = 16 << 20  # per stream: what containerd keeps of an ExecSync (CRI)
MAX_STDIN = 1 << 20
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STR = 128 * 1024
# The id is echoed in every reply, to a client that may never read them: what it may
# make the supervisor hold is SNDHWM replies times this (the envelope has its own 4 KiB).
MAX_ID = 4096  # bytes, encoded
MAX_ID_DEPTH = 8  # arrays or maps within arrays or maps
_STREAM_KEYS = frozenset(("stream", "interactive", "tty", "detach"))




def _string(value: Any, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if not value and not empty:
        raise _bad(f"{name} must not be empty")
    if "\0" in value:
        raise _bad(f"{name} must not contain NUL")
    if len(value) > MAX_STR:
        raise _bad(f"{name} is longer than {MAX_STR} characters")
    return value




@dataclass
class ExecRequest:
    container: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    stdin: bytes = b""
    capture: int = DEFAULT_CAPTURE
    privileged: bool = False
    stream: StreamOptions | None = None  # streamed (protocol/streams.py); None: one reply


def check_id(value: Any) -> Any:
    """The request id if it may be echoed: nil, a bool, a number, a string, bytes, or
    arrays and maps of these, at most MAX_ID bytes encoded and MAX_ID_DEPTH deep."""
    if type(value) is int or value is None:  # what clients send: no walk
        return value
    if codec.encoded_size(value, MAX_ID, MAX_ID_DEPTH) is None:
        raise _bad(f"id must be a msgpack value of at most {MAX_ID} bytes and {MAX_ID_DEPTH} levels")
    return value


def echoable_id(req: dict) -> Any:
    """The id to put in the reply to req: its own, or nil when that one is too large."""
    try:
        return check_id(req.get("id"))
    except WarmexecError:
        return None


def check_envelope(req: dict) -> tuple[Any, str]:
    """Validate the fields every request has; return (id, op)."""
    req_id = check_id(req.get("id"))
    v = req.get("v")
    if type(v) is not int or v != VERSION:
        raise WarmexecError(errors.UNSUPPORTED_VERSION, f"protocol version must be {VERSION}")
    op = req.get("op")
    if op not in OPS:
        raise _bad(f"unknown op {op!r}" if isinstance(op, str) else "op must be a string")
    return req_id, op


def parse_exec(req: dict) -> ExecRequest:
    container = _string(req.get("container"), "container")
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv:
        raise _bad("argv must be a non-empty list of strings")
    if len(argv) > MAX_ARGS:
        raise _bad(f"argv has more than {MAX_ARGS} entries")
    argv = [_string(a, "argv entry", empty=i > 0) for i, a in enumerate(argv)]
    env = _optional(req, "env", dict, {})
    if len(env) > MAX_ENV:
        raise _bad(f"env has more than {MAX_ENV} entries")
    for k, v in env.items():
        if "=" in _string(k, "env name"):
            raise _bad("env name must not contain '='")
        _string(v, f"env {k}", empty=True)
    cwd = req.get("cwd")
    if cwd is not None and not _string(cwd, "cwd").startswith("/"):
        raise _bad("cwd must be an absolute path")
    user = req.get("user")
    if user is not None:
        _string(user, "user")
    timeout = _optional(req, "timeout", (int, float), None)
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        raise _bad(f"timeout must be in (0, {MAX_TIMEOUT:.0f}] seconds")
    stdin = _optional(req, "stdin", bytes, b"")
    if len(stdin) > MAX_STDIN:
        raise _bad(f"stdin is larger than {MAX_STDIN} bytes")
    capture = _optional(req, "capture", int, DEFAULT_CAPTURE)
    if not 0 <= capture <= MAX_CAPTURE:
        raise _bad(f"capture must be in [0, {MAX_CAPTURE}]")
    privileged = _optional(req, "privileged", bool, False)
    stream = parse_options(req) if _STREAM_KEYS & req.keys() else None
    if stream is not None:
        capture = 0  # its output goes to the client as it comes
    return ExecRequest(container, argv, dict(env), cwd, user,
                       None if timeout is None else float(timeout), stdin, capture, privileged, stream)


def parse_attach(req: dict) -> tuple[str, int]:
    name = _string(req.get("container"), "container")
    pid = req.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise _bad("pid must be a positive integer")
    return name, pid


def parse_detach(req: dict) -> str:
    return _string(req.get("container"), "container")


def ok_reply(req_id: Any, **fields: Any) -> dict:
    return {"v": VERSION, "id": req_id, "ok": True, **fields}


def error_reply(req_id: Any, code: str, message: str) -> dict:
    return {"v": VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}
