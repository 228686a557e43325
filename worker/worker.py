"""The worker: one per container, already inside that container's namespaces.

Forked by the zygote (single-threaded, so setns into a mount or user namespace is
allowed), the worker

1. dies with the zygote (PR_SET_PDEATHSIG) and is non-dumpable before it touches the
   container (CVE-2016-9962);
2. takes a pidfd on the container's init and checks its start time against pid reuse;
3. opens everything it needs on the host side *before* setns: the container's
   ``cgroup.procs`` files and, if it has one, its cgroup namespace;
4. joins the container's other namespaces in one setns(pidfd, flags) call;
5. serves the supervisor: each request for a credential profile forks a spawner (see
   :mod:`spawner`) whose socket goes back to the supervisor, which then talks to the
   spawner directly. The worker stays root, outside the container's pid namespace and
   cgroups, holding no exec state.

When the container's init exits (its pidfd polls readable) the worker says so and exits.
"""

from __future__ import annotations

import os
import select
import signal
import socket

from ..protocol import ipc
from . import creds, linux
from .spawner import spawner_main
from .users import UnknownUser


def worker_main(sock: socket.socket, spec: dict, zygote_pid: int) -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote_pid:
        return
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    try:
        state = join(spec)
    except OSError as exc:
        ipc.send(sock, {"op": "fatal", "errno": exc.errno or 0,
                        "message": f"cannot join container: {exc.strerror or exc}"})
        return
    ipc.send(sock, {"op": "ready", "pid": os.getpid()})
    Worker(sock, spec, state).run()


def join(spec: dict) -> dict:
    init_pid = spec["init_pid"]
    pidfd = os.pidfd_open(init_pid)
    if spec.get("init_start") is not None and start_time(init_pid) != spec["init_start"]:
        raise OSError(3, "container init pid was reused (start time differs)")
    cgroup_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in spec["cgroup_procs"]]
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)  # the host's, for spawners' stdio
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # for host pids
    flags = 0
    cgroupns_fd = None
    for name in spec["namespaces"]:
        if name == "cgroup":  # joined by each spawner after it has moved cgroups
            cgroupns_fd = os.open(f"/proc/{init_pid}/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        else:
            flags |= linux.NAMESPACES[name]
    adj = spec["process"].get("oom_score_adj")
    if adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))
    if flags:
        linux.setns(pidfd, flags)
    if spec.get("keyring"):
        linux.join_session_keyring(spec["keyring"])
    return {"pidfd": pidfd, "cgroup_fds": cgroup_fds, "cgroupns_fd": cgroupns_fd, "devnull": devnull,
            "proc": proc}


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), the value runc records."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


class Worker:
    def __init__(self, sock: socket.socket, spec: dict, state: dict) -> None:
        self.sock = sock
        self.spec = spec
        self.state = state
        self.spawners: dict[int, int] = {}  # pidfd -> pid
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN)
        self.poll.register(state["pidfd"], select.POLLIN)

    def run(self) -> None:
        while True:
            for fd, _ in self.poll.poll():
                if fd == self.sock.fileno():
                    msg, fds = ipc.recv(self.sock)
                    if msg is None:
                        return
                    for extra in fds:
                        os.close(extra)
                    if msg.get("op") == "spawner":
                        self.new_spawner(msg)
                elif fd == self.state["pidfd"]:
                    ipc.send(self.sock, {"op": "container_exited"})
                    return
                else:
                    self.reap(fd)

    def new_spawner(self, msg: dict) -> None:
        tag = msg.get("tag")
        try:
            profile = creds.make_profile(self.spec["process"], msg.get("user"),
                                         bool(msg.get("privileged")))
        except UnknownUser as exc:
            return ipc.send(self.sock, {"op": "spawner", "tag": tag, "ok": False,
                                        "code": "NO_SUCH_USER", "message": str(exc)})
        except PermissionError as exc:
            return ipc.send(self.sock, {"op": "spawner", "tag": tag, "ok": False,
                                        "code": "SPAWN_FAILED", "message": exc.strerror})
        ours, theirs = ipc.socketpair()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            return ipc.send(self.sock, {"op": "spawner", "tag": tag, "ok": False,
                                        "code": "SPAWN_FAILED", "message": f"fork: {exc.strerror}"})
        if pid == 0:
            code = 1
            try:
                self.sock.close()
                ours.close()
                os.close(self.state["pidfd"])
                for pidfd in self.spawners:
                    os.close(pidfd)
                spawner_main(theirs, self.spec, profile, self.state)
                code = 0
            except OSError as exc:  # could not take the profile: tell the supervisor why
                ipc.send(theirs, {"op": "fatal", "errno": exc.errno or 0,
                                  "message": f"spawner setup: {exc.strerror or exc}"})
            finally:
                os._exit(code)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self.spawners[pidfd] = pid
        self.poll.register(pidfd, select.POLLIN)
        ipc.send(self.sock, {"op": "spawner", "tag": tag, "ok": True, "pid": pid,
                             "uid": profile["uid"], "gid": profile["gid"]}, [ours.fileno()])
        ours.close()

    def reap(self, pidfd: int) -> None:
        pid = self.spawners.pop(pidfd)
        self.poll.unregister(pidfd)
        os.close(pidfd)
        os.waitpid(pid, 0)
