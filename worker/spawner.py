"""Serving execs from a worker that already is what an exec'd process must be.

The worker (see :mod:`worker`) has joined the container and taken one credential
profile; this is its loop, over its socketpair with the supervisor::

    supervisor -> {op: spawn, id, argv, env, cwd, capture, announce} (+ fds [stdin] if any)
    worker     -> {op: started, id, pid, container_pid, started_at}
                | {op: failed, id, errno, stage}
    worker     -> {op: out, id, stream, data}...  (only for output over one message)
    worker     -> {op: exited, id, status, utime, stime, maxrss, pid, container_pid,
                   started_at, stdout, stderr, stdout_total, stderr_total}
    supervisor -> {op: kill, id, signal}
    worker     -> {op: container_exited}  (its init's pidfd turned readable; then it exits)

Each exec is a posix_spawn (vfork + exec) of the command in a new session, so the
command inherits cgroups, namespaces and credentials for free. The worker owns the
command's output pipes and keeps up to ``capture`` bytes of each (the rest is read and
dropped), so the supervisor handles two small messages per exec and no descriptors.
The worker lives in the host's pid namespace: posix_spawn returns the host pid, and
the pid inside the container comes from the pidfd's fdinfo (NSpid). Children are
reaped through their pidfds with wait4 (for rusage); nothing else here has children.
The worker runs under the container's seccomp filter: a profile older than Linux 5.3
refuses pidfd_open, and then SIGCHLD (through a wakeup pipe) tells of exits instead.

"started" is sent at once when the spawn asks to ``announce`` it (start hooks or event
subscribers want it); otherwise only for a command still running ANNOUNCE_AFTER later:
a probe that exits sooner costs one message each way, not two ("exited" carries its
pid and start time). If this worker dies meanwhile, the zygote, its subreaper, kills
what it leaves behind (see :mod:`zygote`).
"""

from __future__ import annotations

import _signal
import errno
import functools
import os
import select
import signal
import socket
import stat
import time

from ..protocol import ipc
from . import creds

CHUNK = 96 * 1024  # output per message: well under a socketpair's default send buffer
ANNOUNCE_AFTER = 0.002  # seconds a command runs before an unasked-for "started" is sent
_READ = 65536


class Output:
    """One output pipe of one command: keeps ``limit`` bytes, counts the rest."""

    __slots__ = ("fd", "buf", "limit", "total")

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.buf, self.limit, self.total = fd, bytearray(), limit, 0

    def read(self, budget: int) -> bool:
        """Read what is there, up to budget bytes; True at end of stream."""
        while budget > 0:
            try:
                chunk = os.read(self.fd, _READ)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            if not chunk:
                return True
            budget -= len(chunk)
            self.total += len(chunk)
            room = self.limit - len(self.buf)
            if room > 0:
                self.buf += chunk[:room]
        return False


class Child:
    __slots__ = ("pid", "pidfd", "exec_id", "outputs", "started_at", "container_pid")

    def __init__(self, pid: int, pidfd: int, exec_id: object, outputs: list[Output],
                 container_pid: int | None) -> None:
        self.pid, self.pidfd, self.exec_id, self.outputs = pid, pidfd, exec_id, outputs
        self.container_pid = container_pid
        self.started_at = time.monotonic()


class Spawner:
    def __init__(self, sock: socket.socket, spec: dict, profile: dict, fdinfo: int,
                 init_pidfd: int) -> None:
        self.sock = sock
        self.fdinfo = fdinfo  # our own fdinfo directory in the host's procfs
        self.init_pidfd = init_pidfd
        self.base_env = _env_dict(spec["process"]["env"])
        self.base_env.setdefault("HOME", profile["home"])
        self.cwd = spec["process"]["cwd"] or "/"
        self.deferred = creds.deferred_rlimits(profile)
        # Signals this process ignores would stay ignored across exec: reset them.
        # (_signal's plain ints: signal's enum conversions of 64 signals and their
        # handlers would each cost the worker private memory.)
        self.sigdef = [s for s in _signal.valid_signals()
                       if s not in (_signal.SIGKILL, _signal.SIGSTOP)
                       and _signal.getsignal(s) == _signal.SIG_IGN]
        self.children: dict[int, Child] = {}  # pidfd -> child
        self.by_pid: dict[int, Child] = {}  # pid -> child, without pidfds
        self.by_id: dict[object, Child] = {}
        self.pipes: dict[int, Output] = {}  # read end -> output
        self.unannounced: dict[object, Child] = {}  # exec id -> child, oldest first
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)
        self.poll.register(init_pidfd, select.POLLIN)
        self.sigchld = -1 if _pidfds_allowed() else self._wake_on_sigchld()

    def _wake_on_sigchld(self) -> int:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.signal(_signal.SIGCHLD, _ignore)  # a handler, so that it is delivered
        _signal.set_wakeup_fd(w)
        self.poll.register(r, select.POLLIN)
        return r

    def run(self) -> None:
        while True:
            wait = None
            if self.unannounced:
                oldest = next(iter(self.unannounced.values()))
                wait = max(0.0, oldest.started_at + ANNOUNCE_AFTER - time.monotonic()) * 1000
            for fd, _ in self.poll.poll(wait):
                if fd == self.init_pidfd:
                    ipc.send(self.sock, {"op": "container_exited"})
                    return
                if fd == self.sock.fileno():
                    msg, fds = ipc.recv(self.sock)
                    if msg is None:  # supervisor gone (its commands stay, as runc exec's),
                        return       # or it let go of us (see the zygote)
                    self.handle(msg, fds)
                elif fd in self.pipes:
                    out = self.pipes[fd]
                    if out.read(1 << 20):
                        self.close_output(out)
                elif fd in self.children:
                    self.reap(self.children[fd])
                elif fd == self.sigchld:
                    os.read(fd, 4096)
                    for child in list(self.by_pid.values()):
                        self.reap(child)
            if self.unannounced:
                self.announce_due()

    def handle(self, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        if op == "spawn":
            try:
                self.spawn(msg, fds[0] if fds else 0)  # fd 0 is /dev/null
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "kill":
            child = self.by_id.get(msg.get("id"))
            if child is not None:
                try:
                    os.killpg(child.pid, msg.get("signal", signal.SIGKILL))
                except ProcessLookupError:
                    pass

    def spawn(self, msg: dict, stdin: int) -> None:
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
        capture = msg.get("capture", 0)
        outputs, child_fds = [], [stdin]
        for _ in (1, 2):
            if capture:
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)  # our end only: the command's stays blocking
                outputs.append(Output(r, capture))
                child_fds.append(w)
            else:
                child_fds.append(1)  # /dev/null
        try:
            pid = self.start(path, msg["argv"], env, child_fds)
        except OSError as exc:
            for out in outputs:
                os.close(out.fd)
            return self.fail(exec_id, exc.errno, "exec")
        finally:
            for fd in child_fds[1:]:
                if fd != 1:
                    os.close(fd)
        pidfd = os.pidfd_open(pid) if self.sigchld < 0 else -1
        child = self.by_id[exec_id] = Child(pid, pidfd, exec_id, outputs,
                                            self.container_pid(pidfd, pid))
        if pidfd >= 0:
            self.children[pidfd] = child
            self.poll.register(pidfd, select.POLLIN)
        else:
            self.by_pid[pid] = child
        for out in outputs:
            self.pipes[out.fd] = out
            self.poll.register(out.fd, select.POLLIN)
        if msg.get("announce", True):
            self.announce(child)
        else:
            self.unannounced[exec_id] = child

    def announce(self, child: Child) -> None:
        ipc.send(self.sock, {"op": "started", "id": child.exec_id, "pid": child.pid,
                             "container_pid": child.container_pid, "started_at": child.started_at})

    def announce_due(self) -> None:
        """Send "started" for the commands that have now run ANNOUNCE_AFTER."""
        due = time.monotonic() - ANNOUNCE_AFTER
        for exec_id, child in list(self.unannounced.items()):
            if child.started_at > due:
                return
            del self.unannounced[exec_id]
            self.announce(child)

    def start(self, path: str, argv: list[str], env: dict, fds: list[int]) -> int:
        if self.deferred:
            return self.fork_exec(path, argv, env, fds)
        return os.posix_spawn(path, argv, env,  # fds already in place are ours, inheritable
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)
                                            if fd != i],
                              setsid=True, setsigdef=self.sigdef, setsigmask=())

    def container_pid(self, pidfd: int, pid: int) -> int | None:
        """The child's pid in its own (the container's) pid namespace: NSpid's last field,
        from its pidfd's fdinfo, or else its status in the host's procfs (two levels up
        from our fdinfo directory)."""
        try:
            name = str(pidfd) if pidfd >= 0 else f"../../{pid}/status"
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fdinfo)
            try:
                data = os.read(fd, 2048)
            finally:
                os.close(fd)
            line = data[data.index(b"NSpid:"):].split(b"\n", 1)[0]
            return int(line.split()[-1])
        except (OSError, ValueError):
            return None

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

    def fail(self, exec_id: object, err: int | None, stage: str) -> None:
        ipc.send(self.sock, {"op": "failed", "id": exec_id, "errno": err or 0, "stage": stage})

    def close_output(self, out: Output) -> None:
        if out.fd >= 0:
            self.poll.unregister(out.fd)
            del self.pipes[out.fd]
            os.close(out.fd)
            out.fd = -1

    def reap(self, child: Child) -> None:
        pid, status, ru = os.wait4(child.pid, os.WNOHANG)
        if pid == 0:
            return  # a stale event (a reused fd number, another child's SIGCHLD)
        del self.by_id[child.exec_id]
        if child.pidfd >= 0:
            del self.children[child.pidfd]
        else:
            del self.by_pid[child.pid]
        self.unannounced.pop(child.exec_id, None)
        for out in child.outputs:  # all the command wrote is in the pipe by now; a
            if out.fd >= 0:        # lingering grandchild cannot keep us here
                out.read(1 << 20)
        stdout, stderr = (bytes(o.buf) for o in child.outputs) if child.outputs else (b"", b"")
        if len(stdout) + len(stderr) > CHUNK:
            for stream, data in ((1, stdout), (2, stderr)):
                for i in range(0, len(data), CHUNK):
                    ipc.send(self.sock, {"op": "out", "id": child.exec_id, "stream": stream,
                                         "data": data[i:i + CHUNK]})
            stdout = stderr = b""
        totals = [o.total for o in child.outputs] or [0, 0]
        ipc.send(self.sock, {"op": "exited", "id": child.exec_id, "status": status,
                             "utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss": ru.ru_maxrss,
                             "pid": child.pid, "container_pid": child.container_pid,
                             "started_at": child.started_at,
                             "stdout": stdout, "stderr": stderr,
                             "stdout_total": totals[0], "stderr_total": totals[1]})
        if child.pidfd >= 0:  # the reply is on its way: tidy up after it
            self.poll.unregister(child.pidfd)
            os.close(child.pidfd)
        for out in child.outputs:
            self.close_output(out)


def _pidfds_allowed() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


def _ignore(*_: object) -> None:
    pass


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
    for prefix in _prefixes(path_var):  # stat only: the container's seccomp filter
        try:                              # is ours too, and it may allow no more
            st = os.stat(prefix + name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return prefix + name, 0
    return None, errno.ENOENT


@functools.lru_cache(maxsize=32)
def _prefixes(path_var: str | None) -> tuple[str, ...]:
    """$PATH's directories, each ready to take a name ("" is the current directory).
    No PATH: nothing is searched."""
    return tuple(f"{d or '.'}/" for d in path_var.split(":")) if path_var else ()
