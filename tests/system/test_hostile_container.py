"""A hostile container against its warm worker: runc's CVE classes, each with an image of
our own, each asserting the property (nothing of the host is reachable, no other
container waits, nothing outlives the container) rather than a symptom.

The attacker is the container's root, with CAP_SYS_PTRACE where a test says so; its
tools are small static C programs (tests/hostile/*.c) compiled here.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from warmexec.protocol import Client, codec, errors, ipc
from warmexec.protocol.errors import WarmexecError

from .conftest import Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "hostile-" + secrets.token_hex(8)
F_SEAL_WRITE = 0x0008
KCMP_VM = 1
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """The attacker's static binaries."""
    if shutil.which("gcc") is None or os.uname().machine != "x86_64":
        pytest.skip("needs gcc (setup.sh installs it) and x86-64 to build the hostile tools")
    out = tmp_path_factory.mktemp("hostile")
    built = {}
    for name, flags in (("fake_loader", ["-nostdlib", "-fno-stack-protector"]), ("stopper", [])):
        path = str(out / name)
        subprocess.run(["gcc", "-static", "-O1", *flags, "-o", path,
                        os.path.join(HERE, "hostile", f"{name}.c")], check=True, capture_output=True)
        built[name] = path
    return built


@pytest.fixture(scope="module")
def hostile_supervisor(box, tmp_path_factory):
    """A supervisor with a secret in its environment, on the default path (no hooks)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARMEXEC_TEST_SECRET", SECRET)
        sup = Supervisor(box, str(tmp_path_factory.mktemp("hostile-sup")))
    yield sup
    assert sup.stop() == 0
    assert "internal error" not in sup.read_log()


def rootfs(box, cid: str) -> str:
    return os.path.join(box.dir, "bundles", cid, "rootfs")


def with_caps(box, *caps: str) -> dict:
    cfg = box.config()
    for kind in ("bounding", "effective", "permitted"):
        cfg["process"]["capabilities"][kind].extend(caps)
    return cfg


def host_python() -> tuple[int, int]:
    st = os.stat(os.path.realpath(sys.executable))
    return st.st_dev, st.st_ino


def nspid(host_pid: int) -> list[int]:
    with open(f"/proc/{host_pid}/status") as f:
        return [int(p) for line in f if line.startswith("NSpid:") for p in line.split()[1:]]


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in(ns: str) -> dict[int, int]:
    """Host pid -> container pid of every process in a pid namespace."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and pid_ns(int(name)) == ns:
            try:
                out[int(name)] = nspid(int(name))[-1]
            except (OSError, IndexError):
                continue
    return out


def warmexec_outside(sup, ns: str) -> list[int]:
    """The supervisor and every process under it that is not in the container's pid ns."""
    family, todo = [], [sup.proc.pid]
    while todo:
        pid = todo.pop()
        family.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return [p for p in family if pid_ns(p) != ns]


def shares_memory(a: int, b: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_KCMP, a, b, KCMP_VM, 0, 0) == 0


def runc_exec_detached(box, cid: str, argv: list[str]) -> None:
    """`runc exec -d`, its stdio away from any pipe (the detached process keeps it)."""
    subprocess.run(["runc", "--root", box.root, "exec", "-d", cid, *argv], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30)


def in_host_pid(cid_ns: str, container_pid: int) -> int | None:
    return next((h for h, c in processes_in(cid_ns).items() if c == container_pid), None)


# ------------------------------------------------------------- CVE-2019-5736 class

def test_proc_self_exe_as_interpreter_never_reaches_the_host_binary(box, hostile_supervisor, tools):
    """An image whose scripts say `#!/proc/self/exe` runs whatever executable the
    spawning process has. With the host's interpreter there, a container process would
    hold the host's Python open and could write it once nothing runs it. The worker's
    executable is a sealed in-memory copy: the container gets a file that is not the
    host's and can never be written (the same as runc exec gives: runc's sealed clone)."""
    cid = box.run("exe")
    fs = rootfs(box, cid)
    os.makedirs(os.path.join(fs, "lib64"), exist_ok=True)
    shutil.copy(tools["fake_loader"], os.path.join(fs, "lib64", "ld-linux-x86-64.so.2"))
    with open(os.path.join(fs, "evil"), "w") as f:
        f.write("#!/proc/self/exe\n")
    os.chmod(os.path.join(fs, "evil"), 0o755)
    seen = os.path.join(fs, "tmp", "exe-seen")
    open(seen, "w").close()
    os.chmod(seen, 0o666)
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            for user, privileged in ((None, False), ("alice", False), (None, True)):
                assert c.exec(cid, ["/evil"], user=user, privileged=privileged, timeout=10)["exit_code"] == 0
        lines = open(seen).read().split("\n")[:-1]
        assert len(lines) == 3, lines
        for line in lines:
            dev, ino, seals, _write_errno, link = line.split(" ", 4)
            assert (int(dev), int(ino)) != host_python(), f"the host's interpreter ran inside: {line}"
            assert int(seals) >= 0 and int(seals) & F_SEAL_WRITE, f"its executable can be written: {line}"
            assert link.startswith("/memfd:"), line
    finally:
        box.delete(cid)


# ------------------------------------------------------- CVE-2024-21626 / ptrace class

def _stopper_box(box, tools, tmp_path, name: str) -> tuple[str, str, str, str]:
    """A CAP_SYS_PTRACE container with the stopper in its rootfs, and a host-only
    marker file to look for: (container, marker path, its token, report path)."""
    cid = box.run(name, with_caps(box, "CAP_SYS_PTRACE"))
    fs = rootfs(box, cid)
    shutil.copy(tools["stopper"], os.path.join(fs, "stopper"))
    marker = tmp_path / "host-only-marker"
    token = secrets.token_hex(16)
    marker.write_text(token)
    return cid, str(marker), token, os.path.join(fs, "tmp", "report")


def _start_stopper(box, cid: str, sup, marker: str, report: str, hold: bool) -> None:
    runc_exec_detached(box, cid, ["/stopper", "/tmp/report", marker, str(sup.proc.pid), SECRET,
                                  "1" if hold else "0"])
    wait_for(lambda: os.path.exists(report) and "ready" in open(report).read(), 10, "the stopper")


def test_a_ptrace_container_that_stops_each_new_process_gains_nothing(box, hostile_supervisor, tools,
                                                                       tmp_path):
    """With CAP_SYS_PTRACE the container stops every new process of its pid namespace
    at birth, before it execs (the window of a vfork child that is still the worker).
    What it catches must hold no descriptor of the host (no walk from one reaches a
    host file), not carry the supervisor's environment, not run the host's
    interpreter, and share memory with no process outside the container's pid
    namespace. The exec is answered by its timeout, and the container's next exec works."""
    cid, marker, token, report = _stopper_box(box, tools, tmp_path, "ptrace")
    sup = hostile_supervisor
    try:
        with Client(sup.endpoint) as c:
            worker = wait_ready(c, cid)["worker_pid"]
            ns = pid_ns(box.init_pid(cid))
            _start_stopper(box, cid, sup, marker, report, hold=True)
            stopper_cpid = int(open(report).read().split("ready ")[1].split()[0])
            t0 = time.monotonic()
            rid = c.submit("exec", container=cid, argv=["true"], timeout=2)
            wait_for(lambda: "caught" in open(report).read(), 10, "the stopper to catch a process")
            caught_cpid = int(open(report).read().split("caught ")[1].split()[0])
            caught = in_host_pid(ns, caught_cpid)
            assert caught is not None
            for outside in warmexec_outside(sup, ns):
                assert not shares_memory(caught, outside), \
                    f"the stopped process {caught} shares memory with {outside}, outside the container"
            with pytest.raises(WarmexecError) as e:
                c.result(rid, timeout=10)
            assert e.value.code == errors.TIMEOUT and time.monotonic() - t0 < 5, e.value
            text = open(report).read()
            assert "ESCAPE" not in text and token not in text, text
            assert "SECRET" not in text, text
            for line in text.splitlines():
                if line.startswith("exe "):
                    _, _, dev, ino, *_ = line.split()
                    assert (int(dev), int(ino)) != host_python(), line
                if line.startswith("fd "):
                    link = line.split(" ", 3)[3]
                    assert link.startswith(("pipe:", "socket:", "anon_inode:")) or link == "/dev/null", \
                        f"a process the container can see holds {link!r}"
            stopper = in_host_pid(ns, stopper_cpid)
            os.kill(stopper, signal.SIGKILL)
            os.kill(caught, signal.SIGKILL)
            # The worker was wedged (stuck in vfork), so it was replaced.
            wait_for(lambda: (r := next(x for x in c.list() if x["id"] == cid))["state"] == "READY"
                     and r["worker_pid"] != worker, 15, "a new worker")
            assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
    finally:
        box.delete(cid)


def test_a_ptrace_container_sees_no_warmexec_process_that_holds_the_host(box, hostile_supervisor, tools,
                                                                         tmp_path):
    """The same stopper, continuing what it catches, over many execs and profiles: no
    process it can see, at any instant it catches, leads out of the container."""
    cid, marker, token, report = _stopper_box(box, tools, tmp_path, "ptrace2")
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            _start_stopper(box, cid, hostile_supervisor, marker, report, hold=False)
            for i in range(30):
                user = (None, "alice", "bob")[i % 3]
                r = c.exec(cid, ["sh", "-c", "echo $$"], user=user, timeout=10)
                assert r["exit_code"] == 0
        text = open(report).read()
        assert text.count("caught") >= 10, text[-2000:]
        assert "ESCAPE" not in text and token not in text and "SECRET" not in text
        for line in text.splitlines():
            if line.startswith("fd "):
                link = line.split(" ", 3)[3]  # "": gone before the stop took (nothing read)
                assert link == "" or link.startswith(("pipe:", "socket:", "anon_inode:", "/")), line
                assert not link.startswith(("/proc", "/sys", os.path.dirname(sys.executable))), line
    finally:
        box.delete(cid)


# ------------------------------------------------------------- a container's stall

def test_a_stopped_worker_delays_no_other_container(box, hostile_supervisor):
    """The container stops its own worker, then gets execs large enough to fill the
    worker's socket: the supervisor queues them instead of blocking, another
    container's execs are answered at once, and the stopped container's timed exec
    is answered by its timeout with a code that says what happened."""
    victim, other = box.run("stall"), box.run("stall-other")
    try:
        with Client(hostile_supervisor.endpoint) as c, Client(hostile_supervisor.endpoint) as bulk:
            worker = wait_ready(c, victim)["worker_pid"]
            wait_ready(c, other)
            assert box.exec(victim, ["kill", "-STOP", str(nspid(worker)[-1])]).returncode == 0
            big = ["x" * 100_000] * 39  # 3.9 MB of argv, four times: more than the socket holds
            rids = [bulk.submit("exec", container=victim, argv=["true", *big]) for _ in range(4)]
            t0 = time.monotonic()
            timed = c.submit("exec", container=victim, argv=["true"], timeout=1)
            for _ in range(20):
                t1 = time.monotonic()
                assert c.exec(other, ["true"], timeout=5)["exit_code"] == 0
                assert time.monotonic() - t1 < 1.0, "another container's exec waited"
            with pytest.raises(WarmexecError) as e:
                c.result(timed, timeout=10)
            assert e.value.code == errors.TIMEOUT and "stopped" in e.value.message, e.value
            assert time.monotonic() - t0 < 4
            for rid in rids:  # the worker was replaced: the queued execs are answered too
                with pytest.raises(WarmexecError):
                    bulk.result(rid, timeout=10)
            wait_ready(c, victim)
            assert c.exec(victim, ["true"], timeout=5)["exit_code"] == 0
    finally:
        box.delete(victim)
        box.delete(other)


# ------------------------------------------------------------ nothing outlives it

def _procs(cgroups: list[str]) -> list[int]:
    out = []
    for path in cgroups:
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def _blocked_in_a_fifo() -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/wchan") as f:
                    if f.read() in ("wait_for_partner", "fifo_open", "pipe_read"):
                        return True
            except OSError:
                continue
    return False


def test_nothing_of_warmexec_outlives_a_killed_container(box, hostile_supervisor):
    """Warm workers of two profiles, one exec running, a third profile's worker sent
    to read a FIFO in place of /etc/group; then `runc kill KILL`: every process in the
    container's cgroups goes, and a plain `runc delete` leaves no cgroup behind."""
    cid = box.run("outlive")
    try:
        with Client(hostile_supervisor.endpoint) as c, Client(hostile_supervisor.endpoint) as c2:
            wait_ready(c, cid)
            assert c.exec(cid, ["true"], user="alice")["exit_code"] == 0
            rid = c.submit("exec", container=cid, argv=["sleep", "1000"])
            with open(os.path.join(box.root, cid, "state.json")) as f:
                cgroups = sorted(set(json.load(f)["cgroup_paths"].values()))
            group = os.path.join(rootfs(box, cid), "etc", "group")
            os.unlink(group)
            os.mkfifo(group)
            bob = c2.submit("exec", container=cid, argv=["true"], user="bob")

            def bob_settled() -> bool:  # blocked on the FIFO, or already refused
                try:
                    c2.result(bob, timeout=0.05)
                    return True
                except WarmexecError as exc:
                    return exc.code != errors.TIMEOUT or _blocked_in_a_fifo()
            wait_for(bob_settled, 10, "bob's worker to block on /etc/group or be refused")
            box.kill(cid, "KILL")
            with pytest.raises(WarmexecError) as e:
                c.result(rid, timeout=10)
            assert e.value.code == errors.CONTAINER_EXITED
            wait_for(lambda: not _procs(cgroups), 5, "every process of the container's cgroups to go")
            out = subprocess.run(["runc", "--root", box.root, "delete", cid], capture_output=True, text=True)
            assert out.returncode == 0 and "busy" not in out.stderr, out.stderr
            left = [p for p in cgroups if os.path.isdir(p)]
            assert not left, f"cgroups outlived the container: {left}"
    finally:
        box.delete(cid)


def test_a_container_without_a_real_dev_null_still_gets_its_execs(box, hostile_supervisor):
    """/dev/null is the container's: replaced by a FIFO, it must neither hang a new
    worker nor become the commands' stdio."""
    cid = box.run("devnull")
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            assert box.exec(cid, ["sh", "-c", "rm /dev/null && mkfifo /dev/null"]).returncode == 0
            r = c.exec(cid, ["sh", "-c", "echo out; echo err >&2; readlink /proc/self/fd/0"],
                       user="alice", timeout=10)
            assert (r["exit_code"], r["stdout"].split(b"\n")[0], r["stderr"]) == (0, b"out", b"err\n")
            assert b"/dev/null" not in r["stdout"]
            r = c.exec(cid, ["sh", "-c", "yes | head -c 1000000"], user="alice", capture=0, timeout=10)
            assert r["exit_code"] == 0 and r["stdout"] == b""
    finally:
        box.delete(cid)


# --------------------------------------------------------------- a container's limits

def test_nofile_limit_confines_the_commands_not_the_worker(box, hostile_supervisor):
    """RLIMIT_NOFILE 64: as many concurrent execs as `runc exec` takes, each command
    with exactly the container's limit."""
    cfg = box.config()
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 64}]
    cid = box.run("nofile", cfg)
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            rids = [c.submit("exec", container=cid, argv=["sh", "-c", "sleep 1; ulimit -n; ulimit -Hn"])
                    for _ in range(30)]
            replies = [c.result(rid, timeout=30) for rid in rids]
            assert all(r["exit_code"] == 0 and r["stdout"] == b"64\n64\n" for r in replies), replies[:3]
            assert next(x for x in c.list() if x["id"] == cid)["restarts"] == 0
    finally:
        box.delete(cid)



def test_memory_pressure_answers_each_exec_and_never_crash_loops_the_worker(box, hostile_supervisor):
    """A 48 MiB container. One command that wants more is OOM-killed and reported so,
    its worker untouched. Then 40 execs of 6 MB each at once: the worker (about 12 MB
    resident, the container's largest process) can be the OOM killer's choice, so each
    exec is answered with its exit, oom_killed, or WORKER_LOST naming the OOM killer;
    the worker comes back, a bounded number of times, and serves the next exec."""
    cfg = box.config()
    cfg["linux"].setdefault("resources", {})["memory"] = {"limit": 48 << 20}
    cid = box.run("oom", cfg)
    hog = "x=$(head -c {} /dev/zero | tr '\\0' a); sleep 1"
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            r = c.exec(cid, ["sh", "-c", hog.format(80_000_000)], timeout=20)
            assert (r["exit_code"], r["signal"], r["oom_killed"]) == (137, 9, True), r
            assert next(x for x in c.list() if x["id"] == cid)["restarts"] == 0
            rids = [c.submit("exec", container=cid, timeout=20, argv=["sh", "-c", hog.format(6_000_000)])
                    for _ in range(40)]
            outcomes = []
            for rid in rids:
                try:
                    r = c.result(rid, timeout=60)
                    outcomes.append("oom" if r["oom_killed"] else f"exit {r['exit_code']}")
                except WarmexecError as exc:
                    assert exc.code == errors.WORKER_LOST and "OOM killer" in exc.message, exc
                    outcomes.append(exc.code)
            for _ in range(3):  # and again, while the worker may still be backing off
                try:
                    c.exec(cid, ["sh", "-c", hog.format(6_000_000)], timeout=20)
                except WarmexecError as exc:
                    assert exc.code in (errors.WORKER_LOST, errors.TIMEOUT), exc
            row = next(x for x in c.list() if x["id"] == cid)
            print(f"\n40 execs of 6 MB under 48 MiB: { {o: outcomes.count(o) for o in set(outcomes)} }, "
                  f"{row['restarts']} worker restarts")
            assert row["restarts"] <= 5, f"{row['restarts']} restarts: the worker crash-loops"
            wait_ready(c, cid, 30)
            assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
    finally:
        box.delete(cid)


def test_a_paused_containers_timed_out_exec_says_so(box, hostile_supervisor):
    cid = box.run("pause")
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            rid = c.submit("exec", container=cid, argv=["sleep", "30"], timeout=1)
            wait_for(lambda: b"sleep 30" in box.exec(cid, ["ps", "-o", "args"]).stdout, 10, "the sleep")
            subprocess.run(["runc", "--root", box.root, "pause", cid], check=True)
            t0 = time.monotonic()
            try:
                with pytest.raises(WarmexecError) as e:
                    c.result(rid, timeout=10)
            finally:
                subprocess.run(["runc", "--root", box.root, "resume", cid], check=True)
            assert e.value.code == errors.CONTAINER_PAUSED and "timed out" in e.value.message
            assert time.monotonic() - t0 < 3
            wait_for(lambda: b"sleep 30" not in box.exec(cid, ["ps", "-o", "args"]).stdout, 5,
                     "the killed sleep to go once thawed")
            assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
    finally:
        box.delete(cid)


def test_a_container_whose_state_moves_away_is_not_said_to_have_exited(box, hostile_supervisor):
    cid = box.run("moved")
    state = os.path.join(box.root, cid)
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            rid = c.submit("exec", container=cid, argv=["sleep", "30"])
            wait_for(lambda: b"sleep 30" in box.exec(cid, ["ps", "-o", "args"]).stdout, 10, "the sleep")
            os.rename(state, state + ".away")
            with pytest.raises(WarmexecError) as e:
                c.result(rid, timeout=10)
            assert e.value.code == errors.NO_SUCH_CONTAINER and "no longer served" in e.value.message
            os.rename(state + ".away", state)
            wait_ready(c, cid)
    finally:
        if os.path.exists(state + ".away"):
            os.rename(state + ".away", state)
        box.delete(cid)


def _take_socket(worker_pid: int) -> socket.socket:
    """What a CAP_SYS_PTRACE container can do to its worker: take its socket to the
    supervisor (pidfd_getfd, the same ptrace-access check)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(worker_pid)
    try:
        for fd in sorted(int(n) for n in os.listdir(f"/proc/{worker_pid}/fd")):
            if os.readlink(f"/proc/{worker_pid}/fd/{fd}").startswith("socket:"):
                got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
                assert got >= 0, ctypes.get_errno()
                return socket.socket(fileno=got)
    finally:
        os.close(pidfd)
    raise AssertionError("the worker has no socket")


def test_a_taken_over_worker_cannot_make_the_supervisor_kill_a_host_process(box, hostile_supervisor):
    """The container stops its worker and speaks on its socket: it reads the spawn,
    answers "started" with a pidfd of a host process, then floods output. The host
    process is never taken for the command (its timeout kills nothing of the host), and
    output past the exec's capture makes the supervisor drop the worker."""
    cid = box.run("takeover")
    victim = subprocess.Popen(["sleep", "100"])
    try:
        with Client(hostile_supervisor.endpoint) as c:
            worker = wait_ready(c, cid)["worker_pid"]
            os.kill(worker, signal.SIGSTOP)
            sock = _take_socket(worker)
            rid = c.submit("exec", container=cid, argv=["sleep", "30"], timeout=1, capture=100)
            spawn, fds = ipc.recv(sock)
            for fd in fds:
                os.close(fd)
            assert spawn["op"] == "spawn"
            vfd = os.pidfd_open(victim.pid)
            ipc.send(sock, {"op": "started", "id": spawn["id"], "pid": victim.pid,
                            "started_at": time.monotonic()}, [vfd])
            os.close(vfd)
            with pytest.raises(WarmexecError) as e:
                c.result(rid, timeout=10)
            assert e.value.code == errors.TIMEOUT
            assert victim.poll() is None, "the supervisor killed a host process a worker named"
            sock.close()  # that worker, stopped, was replaced: take over the next one
            worker = wait_for(lambda: (r := next(x for x in c.list() if x["id"] == cid))["state"] == "READY"
                              and r["worker_pid"] != worker and r["worker_pid"], 15, "a new worker")
            os.kill(worker, signal.SIGSTOP)
            sock = _take_socket(worker)
            rid = c.submit("exec", container=cid, argv=["true"], capture=100)
            spawn, _ = ipc.recv(sock)
            ipc.send(sock, {"op": "out", "id": spawn["id"], "stream": 1, "data": b"x" * 4096})
            with pytest.raises(WarmexecError) as e:
                c.result(rid, timeout=10)
            assert e.value.code == errors.WORKER_LOST and "malformed" in e.value.message, e.value
            sock.close()
            assert victim.poll() is None
            wait_for(lambda: (r := next(x for x in c.list() if x["id"] == cid))["state"] == "READY"
                     and r["worker_pid"] != worker, 15, "a new worker")
            assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
    finally:
        victim.kill()
        victim.wait()
        box.delete(cid)


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Read every readable mapping of pid (what a CAP_SYS_PTRACE process may read); a
    process gone meanwhile (a joiner) holds nothing."""
    try:
        maps, mem = open(f"/proc/{pid}/maps"), open(f"/proc/{pid}/mem", "rb", 0)
    except (FileNotFoundError, ProcessLookupError):
        return False
    with maps, mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


def test_a_worker_holds_nothing_of_another_container(box, hostile_supervisor):
    """Workers are copies of the zygote's memory: had the zygote ever held a container's
    spec, a later worker, which a CAP_SYS_PTRACE container can read, would carry it.
    Container B's environment (with a secret) and an exec's env into B never reach the
    memory of A's workers."""
    token = "b-secret-" + secrets.token_hex(12)
    cfg = box.config()
    cfg["process"]["env"].append("WE_B_SECRET=" + "x" * 8000 + token)  # far into any buffer
    b = box.run("mem-b", cfg)
    a = None
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, b)
            assert c.exec(b, ["true"], user="alice", env={"EXEC_SECRET": token + "-exec"})["exit_code"] == 0
            a = box.run("mem-a")
            wait_ready(c, a)
            assert c.exec(a, ["true"], user="bob")["exit_code"] == 0
            workers = [p for p in warmexec_outside(hostile_supervisor, "")
                       if a in open(f"/proc/{p}/cgroup").read()]
            assert len(workers) >= 2, workers  # A's own profile's and bob's (a joiner may linger)
            b_worker = next(x for x in c.list() if x["id"] == b)["worker_pid"]
            assert _memory_holds(b_worker, token.encode())  # the check can see it where it is
            for pid in workers:
                assert not _memory_holds(pid, token.encode()), f"worker {pid} of A holds B's secret"
    finally:
        box.delete(b)
        if a:
            box.delete(a)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].split()


def test_no_warmexec_process_in_a_container_shares_the_hosts_session_or_terminal(box, hostile_supervisor):
    """kill(0, SIGKILL) from a worker a CAP_SYS_PTRACE container took over would reach
    every process of the worker's group, and /dev/tty is its session's terminal: each
    worker must lead nothing of the host's, in a session without a terminal."""
    cid = box.run("session")
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, cid)
            assert c.exec(cid, ["true"], user="alice")["exit_code"] == 0
            ns = pid_ns(box.init_pid(cid))
            sup = _stat_fields(hostile_supervisor.proc.pid)
            workers = [p for p in warmexec_outside(hostile_supervisor, "") if pid_ns(p) == ns]
            assert len(workers) >= 2, workers
            for pid in workers:
                pgrp, session, tty = (int(x) for x in _stat_fields(pid)[2:5])
                assert tty == 0, f"worker {pid} has a controlling terminal"
                assert (pgrp, session) != (int(sup[2]), int(sup[3])), f"worker {pid} is in the host's group"
                members = [p for p in os.listdir("/proc") if p.isdigit() and _group_of(int(p)) == pgrp]
                outside = [int(p) for p in members if pid_ns(int(p)) != ns]
                assert not outside, f"worker {pid}'s process group holds host processes {outside}"
            r = c.exec(cid, ["sh", "-c", "echo x > /dev/tty"], timeout=5)
            assert r["exit_code"] != 0  # no terminal to reach
    finally:
        box.delete(cid)


def _group_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[2])
    except (OSError, IndexError, ValueError):
        return None


def _take_over(c, cid: str, previous: int | None) -> tuple[int, socket.socket]:
    worker = wait_for(lambda: (r := next(x for x in c.list() if x["id"] == cid))["state"] == "READY"
                      and r["worker_pid"] != previous and r["worker_pid"], 15, "a (new) worker")
    os.kill(worker, signal.SIGSTOP)
    return worker, _take_socket(worker)


def _quick(c, cid: str) -> float:
    t0 = time.monotonic()
    assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
    return time.monotonic() - t0


def test_a_taken_over_worker_sending_garbage_descriptors_and_floods_hurts_no_one_else(box,
                                                                                      hostile_supervisor):
    """Undecodable messages with descriptors attached, a socket whose close would wait
    for ever (SO_LINGER, a full send queue), and 4 MiB of nested junk, each over a
    worker's socket: the worker is dropped each time, the supervisor's descriptors come
    back to where they were, and another container's execs are answered at once."""
    victim, other = box.run("garbage"), box.run("garbage-other")
    fds_of = lambda: len(os.listdir(f"/proc/{hostile_supervisor.proc.pid}/fd"))  # noqa: E731
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with Client(hostile_supervisor.endpoint) as c:
            wait_ready(c, other)
            worker = wait_ready(c, victim)["worker_pid"]
            assert _quick(c, other) < 1
            baseline = fds_of()
            worker, sock = _take_over(c, victim, None)
            junk = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
            for _ in range(50):
                try:
                    sock.sendmsg([b"\xc1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", junk))])
                except OSError:
                    break  # dropped already
            for fd in junk:
                os.close(fd)
            sock.close()
            wait_for(lambda: fds_of() <= baseline + 2, 10, "the supervisor's fds to come back")
            assert _quick(c, other) < 1

            worker, sock = _take_over(c, victim, worker)
            peer = socket.create_connection(listener.getsockname())
            peer.setblocking(False)
            try:
                while True:
                    peer.send(b"x" * 65536)
            except BlockingIOError:
                pass  # its send queue is full, and nobody reads the other end
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 100000))
            ipc.send(sock, {"op": "x"}, [peer.fileno()])
            peer.close()
            sock.close()
            for _ in range(5):
                assert _quick(c, other) < 1, "another container's exec waited on a worker's socket"
            assert c.ping(timeout=2)

            worker, sock = _take_over(c, victim, worker)
            nested = codec.pack({"op": "out", "id": 1, "data": [[[]] * 60000] * 60})
            try:
                sock.sendall(nested[:ipc.MAX_IPC - 1024])
            except OSError:
                pass
            sock.close()
            assert _quick(c, other) < 1
            wait_ready(c, victim, 30)
            assert _quick(c, victim) < 5
            assert next(x for x in c.list() if x["id"] == victim)["restarts"] >= 3
    finally:
        listener.close()
        box.delete(victim)
        box.delete(other)
