"""Stable error codes. Clients branch on these strings; never rename one."""

from __future__ import annotations

BAD_REQUEST = "BAD_REQUEST"  # malformed frame, wrong field type, unknown op
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
NO_SUCH_CONTAINER = "NO_SUCH_CONTAINER"
AMBIGUOUS = "AMBIGUOUS"  # a container id prefix that several containers share
NO_SUCH_USER = "NO_SUCH_USER"  # user or group name not in the container's /etc files
NOT_FOUND = "NOT_FOUND"  # executable not found (exit code 127)
PERMISSION = "PERMISSION"  # executable not executable (exit code 126)
BAD_CWD = "BAD_CWD"  # working directory missing or not enterable
SPAWN_FAILED = "SPAWN_FAILED"  # any other failure to start the process
BUSY = "BUSY"  # in-flight limit reached
FORBIDDEN = "FORBIDDEN"  # the client's key may not do this (access list)
WORKER_LOST = "WORKER_LOST"  # the container's worker died with the exec in flight
CONTAINER_EXITED = "CONTAINER_EXITED"  # the container stopped with the exec in flight
CONTAINER_PAUSED = "CONTAINER_PAUSED"  # frozen (runc pause): refused, as runc exec does
WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"  # the container's namespaces cannot be joined
EXISTS = "EXISTS"  # attach of a name already in use
TIMEOUT = "TIMEOUT"  # no reply / no worker in time (a command's own timeout is timed_out)
UNREACHABLE = "UNREACHABLE"  # client side: the supervisor does not answer
NO_SUCH_EXEC = "NO_SUCH_EXEC"  # a streamed exec's id that names no running (or kept) exec
CLIENT_GONE = "CLIENT_GONE"  # a streamed exec's client was silent for its grace: killed
SHUTTING_DOWN = "SHUTTING_DOWN"
INTERNAL = "INTERNAL"

ALL = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))


class WarmexecError(Exception):
    """An error reply, raised by the client or built by the supervisor."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def no_such_container(name: str) -> WarmexecError:
    return WarmexecError(NO_SUCH_CONTAINER, f"No active container exists with ID {name}")
