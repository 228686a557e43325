"""The spawner: a warm process that already is what an exec'd process must be.

Forked by a worker inside the container's namespaces, a spawner joins the
container's cgroups, takes one credential profile (see :mod:`creds`) and then serves
the supervisor directly over its own socketpair::

    supervisor -> {op: spawn, id, argv, env, cwd} + fds [stdin, stdout, stderr]
    spawner    -> {op: started, id, pid} + fds [pidfd]  |  {op: failed, id, errno, stage}
    supervisor -> {op: ack, id}
    spawner    -> {op: exited, id, status, utime, stime, maxrss}
    supervisor -> {op: kill, id, signal}

The supervisor learns the host pid from the pidfd's fdinfo, which only names a
process that has not been reaped: so a child is reaped only once its start is acked.

Each exec is a posix_spawn (vfork + exec) of the command in a new session with the
given stdio, so the command inherits cgroups, namespaces and credentials for free.
Children are reaped through their pidfds with wait4 (for rusage); nothing else here
has children, so no status is ever stolen.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import socket
import stat

from ..protocol import ipc
from . import creds, linux


def spawner_main(sock: socket.socket, spec: dict, profile: dict, joined: dict) -> None:
    """Become the profile's spawner; ``joined`` holds the fds the worker opened on the
    host before it joined the container (see worker.join)."""
    # Our worker as we see it: 0 when it is outside our pid namespace (a container's).
    worker = os.getppid()
    for fd in joined["cgroup_fds"]:
        os.write(fd, b"0")  # "0" is the writer itself, whatever pid namespace it is in
        os.close(fd)
    if joined["cgroupns_fd"] is not None:
        linux.setns(joined["cgroupns_fd"], linux.CLONE_NEWCGROUP)
        os.close(joined["cgroupns_fd"])
    # Nothing of the supervisor's (its log files, its terminal) stays open in here.
    for target in (0, 1, 2):
        os.dup2(joined["devnull"], target)
    os.close(joined["devnull"])
    creds.apply(profile)
    # A uid change clears the parent-death signal and the dumpable flag: set both now.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    if os.getppid() != worker:  # it died before the death signal was set
        return
    Spawner(sock, spec, profile).run()


class Spawner:
    def __init__(self, sock: socket.socket, spec: dict, profile: dict) -> None:
        self.sock = sock
        self.base_env = _env_dict(spec["process"]["env"])
        self.base_env.setdefault("HOME", profile["home"])
        self.cwd = spec["process"]["cwd"] or "/"
        self.deferred = creds.deferred_rlimits(profile)
        # Signals this process ignores would stay ignored across exec: reset them.
        self.sigdef = [s for s in signal.valid_signals()
                       if s not in (signal.SIGKILL, signal.SIGSTOP)
                       and signal.getsignal(s) == signal.SIG_IGN]
        self.children: dict[int, Child] = {}  # pidfd -> child
        self.by_id: dict[object, Child] = {}
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)

    def run(self) -> None:
        while True:
            for fd, _ in self.poll.poll():
                if fd == self.sock.fileno():
                    msg, fds = ipc.recv(self.sock)
                    if msg is None:
                        return  # supervisor gone: children stay, like runc exec's
                    self.handle(msg, fds)
                else:
                    self.exited(fd)

    def handle(self, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        if op == "spawn":
            try:
                self.spawn(msg, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "ack":
            child = self.by_id.get(msg.get("id"))
            if child is not None:
                child.acked = True
                if child.exited:
                    self.reap(child.pidfd)
        elif op == "kill":
            child = self.by_id.get(msg.get("id"))
            if child is not None:
                try:
                    os.killpg(child.pid, msg.get("signal", signal.SIGKILL))
                except ProcessLookupError:
                    pass

    def spawn(self, msg: dict, fds: list[int]) -> None:
        exec_id = msg["id"]
        env = dict(self.base_env)
        env.update(msg.get("env") or {})
        try:
            os.chdir(msg.get("cwd") or self.cwd)
        except OSError as exc:
            return self.fail(exec_id, exc.errno, "cwd")
        path, err = lookup(msg["argv"][0], env.get("PATH"))
        if path is None:
            return self.fail(exec_id, err, "lookup")
        try:
            if self.deferred:
                pid = self.fork_exec(path, msg["argv"], env, fds)
            else:
                pid = os.posix_spawn(
                    path, msg["argv"], env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)],
                    setsid=True, setsigdef=self.sigdef, setsigmask=())
        except OSError as exc:
            return self.fail(exec_id, exc.errno, "exec")
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = self.by_id[exec_id] = Child(pid, pidfd, exec_id)
        self.poll.register(pidfd, select.POLLIN)
        ipc.send(self.sock, {"op": "started", "id": exec_id, "pid": pid}, [pidfd])

    def fork_exec(self, path: str, argv: list[str], env: dict, fds: list[int]) -> int:
        """Fork-per-exec for profiles whose rlimits the spawner must not take itself."""
        rd, wr = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                os.close(rd)
                os.setsid()
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                for s in self.sigdef:
                    signal.signal(s, signal.SIG_DFL)
                for res, soft, hard in self.deferred:
                    resource.setrlimit(res, (creds._lim(soft), creds._lim(hard)))
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

    def fail(self, exec_id: object, err: int | None, stage: str) -> None:
        ipc.send(self.sock, {"op": "failed", "id": exec_id, "errno": err or 0, "stage": stage})

    def exited(self, pidfd: int) -> None:
        child = self.children[pidfd]
        self.poll.unregister(pidfd)
        child.exited = True
        if child.acked:
            self.reap(pidfd)

    def reap(self, pidfd: int) -> None:
        child = self.children.pop(pidfd)
        os.close(pidfd)
        _, status, ru = os.wait4(child.pid, 0)
        del self.by_id[child.exec_id]
        ipc.send(self.sock, {"op": "exited", "id": child.exec_id, "status": status,
                             "utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss": ru.ru_maxrss})


class Child:
    __slots__ = ("acked", "exec_id", "exited", "pid", "pidfd")

    def __init__(self, pid: int, pidfd: int, exec_id: object) -> None:
        self.pid, self.pidfd, self.exec_id = pid, pidfd, exec_id
        self.acked = self.exited = False


def _env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def lookup(name: str, path_var: str | None) -> tuple[str | None, int]:
    """Find the executable as Go's exec.LookPath (runc) does: a name with a slash is
    used as is; otherwise the first regular file with an execute bit on $PATH."""
    if "/" in name:
        return name, 0
    for d in path_var.split(":") if path_var else ():  # no PATH: nothing is searched
        candidate = os.path.join(d or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate, 0
    return None, errno.ENOENT
