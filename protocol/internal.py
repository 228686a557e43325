"""The messages between the supervisor and its zygote, joiners and workers, in one place.

Both sides import this module: each message has one constructor here (its fields are
its keyword arguments) and one entry in ``SCHEMA``, which is what a receiver checks a
message against. Transport (SEQPACKET datagrams, descriptors) is :mod:`ipc`'s.

==============  ===================  ==========================================  ======
op              from -> to           fields                                      fds
==============  ===================  ==========================================  ======
fork            supervisor -> zygote tag, seccomp                                -
forked          zygote -> supervisor tag, pid, error                             socket,
                                                                                 pidfd
join            supervisor -> joiner spec, user, privileged                      -
ready           joiner -> supervisor pid, uid, gid                               pidfd
fatal           joiner -> supervisor code, errno, message                        -
spawn           supervisor -> worker id, argv, env, cwd, capture, stdin,         stdin,
                                     announce, ack; streamed execs only:         stdout,
                                     streams, tty, rows, cols                    stderr
ack             supervisor -> worker ack                                         -
resize          supervisor -> worker id, rows, cols (a streamed exec's terminal)  -
started         worker -> supervisor id, pid, started_at                         pidfd
failed          worker -> supervisor id, errno, stage                            -
out             worker -> supervisor id, stream, data                            -
exited          worker -> supervisor id, seq, status, utime, stime, maxrss,      pidfd
                                     pid, started_at, stdout, stderr,
                                     stdout_total, stderr_total
==============  ===================  ==========================================  ======

The joiner becomes the worker (it forks it and exits), so ``ready`` and ``fatal`` come
over the same socket as the worker's messages. What a worker or joiner sends is checked
with :func:`check`: they are processes of a container, which may have taken them over.
"""

from __future__ import annotations

FORK, FORKED = "fork", "forked"
JOIN, READY, FATAL = "join", "ready", "fatal"
SPAWN, ACK, RESIZE = "spawn", "ack", "resize"
STARTED, FAILED, OUT, EXITED = "started", "failed", "out", "exited"

NONE = type(None)

#: op -> field -> the type(s) its value may have. bool is never taken for an int.
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    FORK: {"tag": int, "seccomp": (dict, NONE)},
    FORKED: {"tag": int, "pid": int, "error": (str, NONE)},
    JOIN: {"spec": dict, "user": (str, NONE), "privileged": bool},
    READY: {"pid": int, "uid": int, "gid": int},
    FATAL: {"code": str, "errno": int, "message": str},
    SPAWN: {"id": int, "argv": list, "env": dict, "cwd": (str, NONE), "capture": int, "stdin": bool,
            "announce": bool, "ack": int},
    ACK: {"ack": int},
    RESIZE: {"id": int, "rows": int, "cols": int},
    STARTED: {"id": int, "pid": int, "started_at": float},
    FAILED: {"id": int, "errno": int, "stage": str},
    OUT: {"id": int, "stream": int, "data": bytes},
    EXITED: {"id": int, "seq": int, "status": int, "utime": float, "stime": float, "maxrss": int,
             "pid": int, "started_at": float, "stdout": bytes, "stderr": bytes,
             "stdout_total": int, "stderr_total": int},
}

#: Fields a message may carry beyond its schema's: a streamed exec's spawn alone has
#: them, so the one-shot spawn stays as it was. ``streams``: the command's stdout and
#: stderr pipes follow stdin among the descriptors (the supervisor reads them itself).
#: ``tty``: one output pipe follows stdin, and the worker gives the command a terminal
#: of rows x cols, relayed to the pipes (worker/terminal.py).
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    SPAWN: {"streams": bool, "tty": bool, "rows": int, "cols": int}}

#: What the supervisor accepts on a worker's socket: the joiner's two, then the worker's.
FROM_JOINER = frozenset((READY, FATAL))
FROM_WORKER = frozenset((STARTED, FAILED, OUT, EXITED))


class BadMessage(ValueError):
    pass


def check(msg: dict, ops: frozenset[str]) -> str:
    """The message's op, once it is one of ops with every field of its schema, each of
    its type (and no others). Raise BadMessage otherwise."""
    op = msg.get("op")
    if op not in ops:
        raise BadMessage(f"unexpected op {op!r}")
    fields = SCHEMA[op]
    if len(msg) != len(fields) + 1:
        optional = OPTIONAL.get(op, {})
        extra = {k: optional.get(k) for k in msg if k != "op" and k not in fields}
        if None in extra.values() or len(msg) != len(fields) + len(extra) + 1:
            raise BadMessage(f"{op}: fields {sorted(k for k in msg if k != 'op')} are not {sorted(fields)}")
        fields = {**fields, **extra}
    for name, kind in fields.items():
        value = msg.get(name)
        if not isinstance(value, kind) or (value is True or value is False) and kind is not bool:
            raise BadMessage(f"{op}: {name} is a {type(value).__name__}")
    return op


# ---- constructors: one per message ------------------------------------------------
def fork(tag: int, seccomp: dict | None) -> dict:
    return {"op": FORK, "tag": tag, "seccomp": seccomp}


def forked(tag: int, pid: int, error: str | None = None) -> dict:
    return {"op": FORKED, "tag": tag, "pid": pid, "error": error}


def join(spec: dict, user: str | None, privileged: bool) -> dict:
    return {"op": JOIN, "spec": spec, "user": user, "privileged": privileged}


def ready(pid: int, uid: int, gid: int) -> dict:
    return {"op": READY, "pid": pid, "uid": uid, "gid": gid}


def fatal(code: str, errno: int, message: str) -> dict:
    return {"op": FATAL, "code": code, "errno": errno, "message": message}


def spawn(id: int, argv: list[str], env: dict[str, str], cwd: str | None, capture: int, stdin: bool,
          announce: bool, ack: int, **streamed: object) -> dict:
    """streamed: ``streams``, ``tty``, ``rows``, ``cols`` (OPTIONAL), only for a streamed exec."""
    msg = {"op": SPAWN, "id": id, "argv": argv, "env": env, "cwd": cwd, "capture": capture,
           "stdin": stdin, "announce": announce, "ack": ack}
    msg.update(streamed)
    return msg


def ack(seq: int) -> dict:
    return {"op": ACK, "ack": seq}


def resize(id: int, rows: int, cols: int) -> dict:
    return {"op": RESIZE, "id": id, "rows": rows, "cols": cols}


def started(id: int, pid: int, started_at: float) -> dict:
    return {"op": STARTED, "id": id, "pid": pid, "started_at": started_at}


def failed(id: int, errno: int, stage: str) -> dict:
    return {"op": FAILED, "id": id, "errno": errno, "stage": stage}


def out(id: int, stream: int, data: bytes) -> dict:
    return {"op": OUT, "id": id, "stream": stream, "data": data}


def exited(id: int, seq: int, status: int, utime: float, stime: float, maxrss: int, pid: int,
           started_at: float, stdout: bytes, stderr: bytes, stdout_total: int, stderr_total: int) -> dict:
    return {"op": EXITED, "id": id, "seq": seq, "status": status, "utime": utime, "stime": stime,
            "maxrss": maxrss, "pid": pid, "started_at": started_at, "stdout": stdout, "stderr": stderr,
            "stdout_total": stdout_total, "stderr_total": stderr_total}
