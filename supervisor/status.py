"""Turning a wait status into what a shell (and docker) would report."""

from __future__ import annotations

import errno
import os

from ..protocol import errors


def decode(status: int) -> dict:
    """exit_code with the shell convention (signal N -> 128+N), the signal, core flag."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"exit_code": 128 + sig, "signal": sig, "core_dumped": os.WCOREDUMP(status)}
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status), "signal": None, "core_dumped": False}
    # Stopped/continued statuses are never reported by wait4 without WUNTRACED.
    return {"exit_code": 255, "signal": None, "core_dumped": False}


def spawn_failure(err: int, stage: str, argv0: str, cwd: str | None) -> tuple[str, str, int | None]:
    """(error code, message, exit code) for a process that never started.

    Docker's convention: executable not found is 127, found but not executable 126.
    """
    reason = _go_error(err) if err else "unknown error"
    if stage == "lookup":
        return errors.NOT_FOUND, f'exec: "{argv0}": executable file not found in $PATH', 127
    if stage == "cwd":
        return errors.BAD_CWD, f"chdir to cwd ({cwd!r}) failed: {reason}", None
    if stage in ("pipe", "stdin"):  # the worker lives under the container's fd limit
        return errors.SPAWN_FAILED, f"no descriptor left for the exec's {stage} ({reason}): " \
                                    "the container's open-file limit", None
    if stage == "tty":
        return errors.SPAWN_FAILED, f"no terminal in the container ({reason}): it needs its own devpts " \
                                    "with /dev/pts/ptmx or /dev/ptmx", None
    if err in (errno.ENOENT, errno.ENOTDIR):
        return errors.NOT_FOUND, f'exec: "{argv0}": {reason}', 127
    if err in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
        return errors.PERMISSION, f'exec: "{argv0}": {reason}', 126
    return errors.SPAWN_FAILED, f'exec: "{argv0}": {reason}', None


def _go_error(err: int) -> str:
    """An errno as Go spells it (runc's and docker's messages): strerror, lower case."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]
