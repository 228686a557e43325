"""A worker: the warm process inside one container that spawns its execs.

The joiner (:mod:`join`) forked it inside the container's namespaces and cgroups
with one credential profile already taken, so each exec is a ``posix_spawn`` (vfork +
exec) in a new session that inherits all of it. It talks to the supervisor over its
socketpair, in the messages of :mod:`warmexec.protocol.internal`: ``spawn`` and ``ack``
come down (an exec's stdin pipe with its spawn, when it has input); ``started``,
``failed``, ``out`` (only for output over one message) and ``exited`` go up, with the
command's pidfd on ``started`` and ``exited``.

The worker is a process of the container: the container can see it, signal it and,
with CAP_SYS_PTRACE, trace it. So it holds nothing a container process may not hold:
no descriptor of the host (its socket, the container's own /dev/null, the pipes of
its commands), no credential beyond the exec's, memory shared only with its own vfork
children (inside the container too), and an executable that is a sealed in-memory
copy. The supervisor takes nothing it says on trust: the pid it reports is only a
hint (``pid`` is the container pid), the host pid comes from the pidfd.

The worker owns its commands' output pipes and keeps up to ``capture`` bytes of each
stream (the rest is read and dropped): a flood costs the container's CPU, never the
supervisor's memory.

"started" goes at once when the spawn asks to ``announce`` it (start hooks or event
subscribers want it), otherwise only for a command still running ANNOUNCE_AFTER later:
a probe that exits sooner costs one message each way. Its pidfd, sent with "started"
or with "exited", is how the supervisor learns the host pid (from the kernel, never
from us). So a command's exit is taken from its pidfd without reaping it (waitid
WNOWAIT, with its rusage) and the zombie, which keeps its pid, is reaped only once the
supervisor's ``ack`` (carried by its next spawn, or sent alone soon after) covers that
exit's ``seq``. Under a seccomp allow-list that predates pidfd_open, SIGCHLD (through a
wakeup pipe) tells of exits instead, each reaped at once, and the supervisor learns no
host pid. A worker has no children but its commands.
"""

from __future__ import annotations

import _signal
import errno
import os
import select
import socket
import time

from ..protocol import internal, ipc
from . import creds, linux, spawn, terminal
from .paths import PathCache, env_dict, lookup

CHUNK = 96 * 1024  # output per message: well under a socketpair's default send buffer
ANNOUNCE_AFTER = 0.002  # seconds a command runs before an unasked-for "started" is sent
_READ = 65536
PATH_CACHE_BYTES = 64 * 1024  # $PATH values remembered, in bytes of their text


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
    __slots__ = ("pid", "exec_id", "outputs", "pidfd", "started_at", "relay")

    def __init__(self, pid: int, exec_id: object, outputs: list[Output], pidfd: int) -> None:
        self.pid, self.exec_id, self.outputs, self.pidfd = pid, exec_id, outputs, pidfd
        self.started_at = time.monotonic()
        self.relay: terminal.Relay | None = None  # a streamed exec's terminal


class ExecLoop:
    def __init__(self, sock: socket.socket, spec: dict, profile: dict, null: bool) -> None:
        self.sock = sock
        self.null = null  # fds 0-2 are the container's /dev/null (else an empty pipe)
        self.base_env = env_dict(spec["process"]["env"])
        self.base_env.setdefault("HOME", profile["home"])
        self.cwd = spec["process"]["cwd"] or "/"
        self.deferred = creds.deferred_rlimits(profile)
        # A terminal's relay writes to pipes the supervisor may close: EPIPE, not death.
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
        # Signals this process ignores would stay ignored across exec: reset them.
        # (_signal's plain ints: signal's enum conversions of 64 signals and their
        # handlers would each cost the worker private memory.)
        self.sigdef = [s for s in _signal.valid_signals()
                       if s not in (_signal.SIGKILL, _signal.SIGSTOP)
                       and _signal.getsignal(s) == _signal.SIG_IGN]
        self.by_pid: dict[int, Child] = {}
        self.by_id: dict[object, Child] = {}
        self.by_pidfd: dict[int, Child] = {}
        self.pipes: dict[int, Output] = {}  # read end -> output
        self.relays: dict[int, terminal.Relay] = {}  # a terminal's fds -> its relay
        self.unannounced: dict[object, Child] = {}  # exec id -> child, oldest first
        self.zombies: dict[int, int] = {}  # exit seq -> pid, until the supervisor's ack
        self.seq = 0
        self.paths = PathCache(PATH_CACHE_BYTES)
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)
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
            for fd, ev in self.poll.poll(wait):
                if fd == self.sock.fileno():
                    msg, fds = ipc.recv(self.sock)
                    if msg is None:  # supervisor gone (its commands stay, as runc exec's),
                        return       # or it let go of us
                    self.handle(msg, fds)
                elif fd in self.pipes:
                    out = self.pipes[fd]
                    if out.read(1 << 20):
                        self.close_output(out)
                elif fd in self.relays:
                    self.relays[fd].ready(fd, ev)
                elif fd in self.by_pidfd:
                    self.exited(self.by_pidfd[fd])
                elif fd == self.sigchld:
                    os.read(fd, 4096)
                    self.reap_any()
            if self.unannounced:
                self.announce_due()

    def handle(self, msg: dict, fds: list[int]) -> None:
        """A spawn or an ack from the supervisor (which alone kills commands: it holds
        their pidfds, or finds them among our children when we cannot open any)."""
        if msg["op"] == internal.RESIZE:
            child = self.by_id.get(msg["id"])
            if child is not None and child.relay is not None:
                child.relay.resize(msg["rows"], msg["cols"])
            return
        try:
            self.reap_acked(msg["ack"])
            if msg["op"] == internal.SPAWN:
                streamed = (1 if msg.get("tty") else 2) if msg.get("streams") else 0  # after stdin
                if len(fds) < msg["stdin"] + streamed:  # no room for them under our fd limit
                    return self.fail(msg["id"], errno.EMFILE, "stdin")
                if streamed:
                    return self.spawn_streamed(msg, fds)
                self.spawn(msg, fds[0] if fds else 0)  # fd 0 reads nothing
        finally:
            for fd in fds:
                if fd >= 0:  # -1: kept (a terminal's relay took it)
                    os.close(fd)

    def prepare(self, msg: dict) -> tuple[str | None, dict]:
        """The executable's path and the env of a spawn; (None, _) once failed."""
        env = dict(self.base_env)
        env.update(msg["env"])
        try:
            os.chdir(msg["cwd"] or self.cwd)
        except OSError as exc:
            self.fail(msg["id"], exc.errno, "cwd")
            return None, env
        path, err = lookup(msg["argv"][0], env.get("PATH"), self.paths)
        if path is None:
            self.fail(msg["id"], err, "lookup")
        return path, env

    def spawn_streamed(self, msg: dict, fds: list[int]) -> None:
        """A streamed exec: its stdio are the supervisor's pipes (stdin, if any, then
        stdout and stderr), which the supervisor reads and writes itself; with ``tty``
        a terminal of the container's, relayed to the pipes (stdin, if any, and one
        output) by us (terminal.py)."""
        path, env = self.prepare(msg)
        if path is None:
            return
        if not msg.get("tty"):
            self.launch(msg, path, env, [fds[0] if msg["stdin"] else 0, fds[-2], fds[-1]], [])
            return
        try:
            master, peer = terminal.open_pty(msg.get("rows", 24), msg.get("cols", 80))
        except OSError as exc:
            return self.fail(msg["id"], exc.errno, "tty")
        try:
            child = self.launch(msg, path, env, [peer, peer, peer], [], ctty=True)
        finally:
            os.close(peer)  # the command's now: the master reads as ended once it is gone
        if child is None:
            os.close(master)
            return
        relay = child.relay = terminal.Relay(master, fds[0] if msg["stdin"] else -1, fds[-1],
                                             lambda fd, mask: self.poll_relay(relay, fd, mask))
        fds[-1] = -1
        if msg["stdin"]:
            fds[0] = -1
        relay.update()

    def poll_relay(self, relay: terminal.Relay, fd: int, mask: int) -> None:
        if mask:
            self.poll.register(fd, mask)  # or change its mask
            self.relays[fd] = relay
        elif self.relays.pop(fd, None) is not None:
            self.poll.unregister(fd)

    def spawn(self, msg: dict, stdin: int) -> None:
        exec_id = msg["id"]
        path, env = self.prepare(msg)
        if path is None:
            return
        capture = msg["capture"]
        outputs: list[Output] = []
        child_fds = [stdin]
        spare = -1  # a descriptor held for the pidfd: the fd limit must not leave a
        try:        # running command without one (it could never be reaped)
            if self.sigchld < 0:
                spare = os.dup(0)
            for _ in (1, 2):
                if capture or not self.null:  # no null device: a pipe read and dropped
                    r, w = os.pipe2(os.O_CLOEXEC)
                    os.set_blocking(r, False)  # our end only: the command's stays blocking
                    outputs.append(Output(r, capture))
                    child_fds.append(w)
                else:
                    child_fds.append(1)  # /dev/null
        except OSError as exc:  # EMFILE: the container's fd limit (it is ours too)
            for fd in [*(o.fd for o in outputs), *child_fds[1:], spare]:
                if fd >= 0:
                    os.close(fd)
            return self.fail(exec_id, exc.errno, "pipe")
        try:
            self.launch(msg, path, env, child_fds, outputs, spare)
        finally:
            for fd in child_fds[1:]:
                if fd != 1:
                    os.close(fd)

    def launch(self, msg: dict, path: str, env: dict, child_fds: list[int], outputs: list[Output],
               spare: int = -2, ctty: bool = False) -> Child | None:
        """Start the command on child_fds and track it (outputs: the pipes we read).
        spare: a descriptor held for its pidfd (-2: take one now); ctty: its stdin is
        a terminal to make its session's controlling terminal."""
        exec_id = msg["id"]
        if spare == -2:
            try:
                spare = os.dup(0) if self.sigchld < 0 else -1
            except OSError as exc:
                return self.fail(exec_id, exc.errno, "pipe")
        try:
            pid = spawn.start(path, msg["argv"], env, child_fds, self.sigdef, self.deferred, ctty)
        except OSError as exc:
            for fd in [*(o.fd for o in outputs), spare]:
                if fd >= 0:
                    os.close(fd)
            return self.fail(exec_id, exc.errno, "exec")
        pidfd = -1
        if spare >= 0:
            os.close(spare)
            pidfd = os.pidfd_open(pid)
        child = self.by_pid[pid] = self.by_id[exec_id] = Child(pid, exec_id, outputs, pidfd)
        if pidfd >= 0:
            self.by_pidfd[pidfd] = child
            self.poll.register(pidfd, select.POLLIN)
        for out in outputs:
            self.pipes[out.fd] = out
            self.poll.register(out.fd, select.POLLIN)
        if msg["announce"]:
            self.announce(child)
        else:
            self.unannounced[exec_id] = child
        return child

    def announce(self, child: Child) -> None:
        ipc.send(self.sock, internal.started(child.exec_id, child.pid, child.started_at),
                 [child.pidfd] if child.pidfd >= 0 else [])

    def announce_due(self) -> None:
        """Send "started" for the commands that have now run ANNOUNCE_AFTER."""
        due = time.monotonic() - ANNOUNCE_AFTER
        for exec_id, child in list(self.unannounced.items()):
            if child.started_at > due:
                return
            del self.unannounced[exec_id]
            self.announce(child)

    def fail(self, exec_id: object, err: int | None, stage: str) -> None:
        ipc.send(self.sock, internal.failed(exec_id, err or 0, stage))

    def close_output(self, out: Output) -> None:
        if out.fd >= 0:
            self.poll.unregister(out.fd)
            del self.pipes[out.fd]
            os.close(out.fd)
            out.fd = -1

    def exited(self, child: Child) -> None:
        """Its pidfd turned readable: report the exit, keeping the zombie (see above)."""
        fd, keep = child.pidfd, True
        try:
            found = linux.exit_status(fd)
        except OSError:  # no waitid(P_PIDFD) here: reap it now, the host pid stays unknown
            _, status, ru = os.wait4(child.pid, 0)
            found, keep = (status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss), False
        if found is None:
            return  # a stale event
        self.poll.unregister(fd)
        del self.by_pidfd[fd]
        if keep:
            self.seq += 1
            self.zombies[self.seq] = child.pid
        else:
            os.close(fd)
            child.pidfd = -1
        self.report(child, *found)

    def reap_acked(self, ack: int) -> None:
        for seq in [s for s in self.zombies if s <= ack]:
            try:
                os.waitpid(self.zombies.pop(seq), os.WNOHANG)
            except ChildProcessError:
                pass

    def reap_any(self) -> None:
        """SIGCHLD: reap every command that has exited (no pidfds here)."""
        while self.by_pid:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.get(pid)
            if child is not None:
                self.report(child, status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)

    def report(self, child: Child, status: int, utime: float, stime: float, maxrss: int) -> None:
        if child.relay is not None:  # a terminal: the exit goes once its output is through
            relay, child.relay = child.relay, None
            return relay.finish(lambda: self.report(child, status, utime, stime, maxrss))
        del self.by_id[child.exec_id], self.by_pid[child.pid]
        self.unannounced.pop(child.exec_id, None)
        for out in child.outputs:  # all the command wrote is in the pipe by now; a
            if out.fd >= 0:        # lingering grandchild cannot keep us here
                out.read(1 << 20)
        stdout, stderr = (bytes(o.buf) for o in child.outputs) if child.outputs else (b"", b"")
        if len(stdout) + len(stderr) > CHUNK:
            for stream, data in ((1, stdout), (2, stderr)):
                for i in range(0, len(data), CHUNK):
                    ipc.send(self.sock, internal.out(child.exec_id, stream, data[i:i + CHUNK]))
            stdout = stderr = b""
        totals = [o.total for o in child.outputs] or [0, 0]
        seq = self.seq if child.pidfd >= 0 else 0
        ipc.send(self.sock, internal.exited(child.exec_id, seq, status, utime, stime, maxrss, child.pid,
                                            child.started_at, stdout, stderr, *totals),
                 [child.pidfd] if child.pidfd >= 0 else [])
        if child.pidfd >= 0:
            os.close(child.pidfd)
        for out in child.outputs:
            self.close_output(out)


def _pidfds_allowed() -> bool:
    """pidfd_open, unless a seccomp allow-list older than Linux 5.3 refuses it."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


def _ignore(*_: object) -> None:
    pass
