"""How each runtime answers the ExecSyncs warmexec answers for it.

The kubelet sees only the answer, so warmexec answers as the runtime behind it would.
Which runtime that is comes from its own ``Version`` reply (``runtime_name``), or from
``warmexec cri --upstream-kind``. The two differ where a command does not simply exit:

* **containerd 1.6** (tests/system/test_cri_box.py records it): a timeout is a gRPC
  ``DEADLINE_EXCEEDED`` error, "failed to exec in container: timeout 1s exceeded:
  context deadline exceeded", the output dropped; each stream is kept up to 16 MiB, and
  a reply over 16 MiB is refused by its gRPC server (``RESOURCE_EXHAUSTED``).
* **CRI-O** (server/container_execsync.go and internal/oci's ExecSyncContainer, conmon's
  ctr_logging.c): a timeout is an answer, not an error: exit code -1 with conmon's
  "command timed out" on stderr and no stdout (the kubelet then fails the probe rather
  than marking it unknown). Output goes through conmon's exec log, each line written as
  a 43-byte timestamp and stream name, "F " (or "P " and a newline for a piece of a
  line, at most one 8 KiB read long), then the line; CRI-O reads the first 16 MiB of
  that log and returns its lines, stdout's and stderr's. :func:`crio_output` keeps what
  that leaves of the two streams, stdout first (conmon interleaves them as they come,
  which the worker's capture no longer tells, and its reads may cut lines elsewhere:
  near the cap the split can differ by a line). Its gRPC limit is above what that cap
  lets through.

A command that cannot start (a missing or non-executable file) is not answered here by
either: nothing ran, so the call goes to the runtime, which gives its own answer.
"""

from __future__ import annotations

import grpc

from .cri_wire import encode_exec_sync_response

CONTAINERD, CRIO = "containerd", "cri-o"
KINDS = (CONTAINERD, CRIO)

CONTAINERD_TIMEOUT = "failed to exec in container: timeout {timeout} exceeded: context deadline exceeded"
CONTAINERD_MAX_REPLY = 16 << 20  # containerd's gRPC server sends no larger message
CRIO_TIMEOUT = b"command timed out"  # conmon's TIMED_OUT_MESSAGE
CRIO_LOG_CAP = 16 << 20  # CRI-O's maxExecSyncSize: bytes of the exec log it reads
CRIO_LINE_HEAD = 45  # conmon's k8s-file line: timestamp and stream (43 bytes), then "F " or "P "
CONMON_READ = 8192  # conmon's read buffer: a longer line is logged in pieces


def kind_of(runtime_name: str) -> str:
    """The kind whose answers warmexec gives, from a Version reply's runtime_name."""
    return CRIO if runtime_name.lower() in ("cri-o", "crio") else CONTAINERD


class Refusal(Exception):
    """An answer that is a gRPC error: its status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def timed_out(kind: str, timeout: int) -> bytes:
    """The answer to an exec killed at its timeout: a response, or Refusal raised."""
    if kind == CRIO:
        return encode_exec_sync_response(b"", CRIO_TIMEOUT, -1)
    raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, CONTAINERD_TIMEOUT.format(timeout=go_duration(timeout)))


def exited(kind: str, stdout: bytes, stderr: bytes, exit_code: int) -> bytes:
    """The answer to an exec that ran to its end (each stream captured up to 16 MiB)."""
    if kind == CRIO:
        stdout, stderr = crio_output(stdout, stderr)
        return encode_exec_sync_response(stdout, stderr, exit_code)
    response = encode_exec_sync_response(stdout, stderr, exit_code)
    if len(response) > CONTAINERD_MAX_REPLY:
        raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: trying to send message larger than max "
                                                          f"({len(response)} vs. {CONTAINERD_MAX_REPLY})")
    return response


def crio_output(stdout: bytes, stderr: bytes) -> tuple[bytes, bytes]:
    """What CRI-O returns of the two streams: the first CRIO_LOG_CAP bytes of conmon's log."""
    if _log_size(stdout) + _log_size(stderr) <= CRIO_LOG_CAP:
        return stdout, stderr  # the common case, without walking the lines
    out, left = _keep(stdout, CRIO_LOG_CAP)
    err, _ = _keep(stderr, left)
    return out, err


def _log_size(data: bytes) -> int:
    """At least the bytes conmon's log takes for data (each piece at most one read)."""
    if not data:
        return 0
    pieces = data.count(b"\n") + len(data) // CONMON_READ + 1
    return len(data) + pieces * (CRIO_LINE_HEAD + 1)


def _keep(data: bytes, budget: int) -> tuple[bytes, int]:
    """The prefix of data whose log lines fit in budget (the last one cut), and what is left."""
    i = 0
    while i < len(data) and budget > CRIO_LINE_HEAD:
        nl = data.find(b"\n", i, i + CONMON_READ)
        end = nl + 1 if nl >= 0 else min(i + CONMON_READ, len(data))
        cost = end - i + CRIO_LINE_HEAD + (0 if nl >= 0 else 1)
        if cost > budget:  # the line the 16 MiB cut goes through: its head is kept
            return data[:i + budget - CRIO_LINE_HEAD], 0
        i, budget = end, budget - cost
    return data[:i], budget if i == len(data) else 0


def go_duration(seconds: int) -> str:
    """Whole seconds as Go's time.Duration prints them (containerd's messages): 1s, 1m30s, 1h0m0s."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"
