"""Starting one command, in a new session, on the descriptors it is to have as 0, 1, 2.

posix_spawn (vfork + exec) where nothing is left to do between the two; a fork per exec
for the profiles whose rlimits the worker must not take itself (they would cap its
pipes) and for a terminal, whose TIOCSCTTY must be the child's own call after its
setsid. Either way the child is the worker's copy for the few calls before ``execve``:
the sealed interpreter, the worker's descriptors (all close-on-exec), nothing of the host.
"""

from __future__ import annotations

import os
import signal

from . import creds, terminal


def start(path: str, argv: list[str], env: dict, fds: list[int], sigdef: list[int],
          deferred: list[tuple[int, int, int]], ctty: bool = False) -> int:
    """The command's pid. sigdef: signals to reset to their default (those the worker
    ignores would stay ignored across exec); deferred: rlimits to apply in the child."""
    if deferred or ctty:
        return fork_exec(path, argv, env, fds, sigdef, deferred, ctty)
    return os.posix_spawn(path, argv, env,  # fds already in place are ours, inheritable
                          file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds) if fd != i],
                          setsid=True, setsigdef=sigdef, setsigmask=())


def fork_exec(path: str, argv: list[str], env: dict, fds: list[int], sigdef: list[int],
              deferred: list[tuple[int, int, int]], ctty: bool) -> int:
    """Fork, then exec in the child (ctty: fd 0 becomes the new session's controlling
    terminal); an exec that fails is reported through a close-on-exec pipe."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 127
        try:
            os.close(rd)
            os.setsid()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            if ctty:
                terminal.make_controlling(0)
            for s in sigdef:
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            for res, soft, hard in deferred:
                creds.set_rlimit(res, soft, hard)
            os.execve(path, argv, env)
        except OSError as exc:
            os.write(wr, exc.errno.to_bytes(4, "little"))
        finally:
            os._exit(code)
    os.close(wr)
    try:
        data = os.read(rd, 4)
    finally:
        os.close(rd)
    if data:
        os.waitpid(pid, 0)
        err = int.from_bytes(data, "little")
        raise OSError(err, os.strerror(err))
    return pid
