"""Dying parts: each way a worker, a container or the supervisor can die ends in a
clear error for the client, and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import Supervisor, SupervisorProcess, wait_for, wait_ready

pytestmark = pytest.mark.root


def _row(client, cid):
    return next((r for r in client.list() if r["id"] == cid), None)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _in_container(box, cid, needle):
    return needle in box.exec(cid, ["ps", "-o", "args"]).stdout.decode()


def test_worker_killed_with_execs_in_flight(box, client):
    cid = box.run("workerkill")
    try:
        row = wait_ready(client, cid)
        rid = client.submit("exec", container=cid, argv=["sleep", "1003"])
        wait_for(lambda: _in_container(box, cid, "sleep 1003"), 10, "the exec to start")
        t0 = time.monotonic()
        os.kill(row["worker_pid"], signal.SIGKILL)
        with pytest.raises(WarmexecError) as e:
            client.result(rid, timeout=5)
        assert e.value.code == errors.WORKER_LOST
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: not _in_container(box, cid, "sleep 1003"), 5, "the lost exec to be killed")
        new = wait_ready(client, cid)
        assert new["worker_pid"] != row["worker_pid"] and new["restarts"] == 1
        assert client.exec(cid, ["true"])["exit_code"] == 0
    finally:
        box.delete(cid)


def test_a_dead_workers_command_is_killed_even_when_the_supervisor_hears_late(box, supervisor):
    """Every command's pidfd reaches the supervisor with its start: a worker that dies
    while the supervisor is frozen leaves its command running (it is the container's
    orphan now), and the supervisor, once it runs again, kills it through that pidfd."""
    cid = box.run("orphans")
    client = Client(supervisor.endpoint)
    try:
        row = wait_ready(client, cid)
        rid = client.submit("exec", container=cid, argv=["sleep", "1004"])
        wait_for(lambda: _in_container(box, cid, "sleep 1004"), 10, "the exec to start")
        os.kill(supervisor.proc.pid, signal.SIGSTOP)
        try:
            os.kill(row["worker_pid"], signal.SIGKILL)
            wait_for(lambda: not _alive(row["worker_pid"]), 5, "the worker to die")
            assert _in_container(box, cid, "sleep 1004")
        finally:
            os.kill(supervisor.proc.pid, signal.SIGCONT)
        with pytest.raises(WarmexecError) as e:
            client.result(rid, timeout=5)
        assert e.value.code == errors.WORKER_LOST
        wait_for(lambda: not _in_container(box, cid, "sleep 1004"), 5, "the lost exec to be killed")
        assert wait_ready(client, cid)["restarts"] == 1
    finally:
        client.close()
        box.delete(cid)


def test_a_host_pid_namespace_container_keeps_its_daemons_when_a_worker_dies(box, client):
    """In a container sharing the host's pid namespace a command's orphans come to the
    zygote (the nearest subreaper), not to a container init: a worker's death must not
    take them, while the dead worker's own command still dies (by the supervisor)."""
    cfg = box.config()
    cfg["linux"]["namespaces"] = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "pid"]
    cid = box.run("hostpid", cfg)
    try:
        row = wait_ready(client, cid)
        client.exec(cid, ["sh", "-c", "setsid sleep 1006 >/dev/null 2>&1 &"])  # a daemon
        rid = client.submit("exec", container=cid, argv=["sleep", "1007"])
        def pids(name):
            out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True).stdout
            return [int(p) for p in out.split()]
        wait_for(lambda: pids("sleep 1006") and pids("sleep 1007"), 10, "both sleeps to run")
        daemon = pids("sleep 1006")[0]
        os.kill(row["worker_pid"], signal.SIGKILL)
        with pytest.raises(WarmexecError) as e:
            client.result(rid, timeout=5)
        assert e.value.code == errors.WORKER_LOST
        wait_for(lambda: not pids("sleep 1007"), 5, "the lost exec to be killed")
        wait_ready(client, cid)
        assert _alive(daemon), "the zygote killed a daemon a command had left behind"
        os.kill(daemon, signal.SIGKILL)
    finally:
        box.delete(cid)


def test_container_dies_mid_exec_and_comes_back(box, client):
    cid = box.run("dies")
    wait_ready(client, cid)
    first_pid = box.init_pid(cid)
    rid = client.submit("exec", container=cid, argv=["sleep", "1000"])
    wait_for(lambda: _in_container(box, cid, "sleep 1000"), 10, "the exec to start")
    box.kill(cid, "KILL")
    with pytest.raises(WarmexecError) as e:
        client.result(rid, timeout=5)
    assert e.value.code == errors.CONTAINER_EXITED
    wait_for(lambda: _row(client, cid) is None, 5, "the container to be dropped")
    with pytest.raises(WarmexecError) as e:
        client.exec(cid, ["true"])
    assert e.value.code == errors.NO_SUCH_CONTAINER
    box.delete(cid)
    # the same id again: a new init, a fresh worker, no confusion with the old pid
    cid2 = box.run("dies")
    try:
        assert cid2 == cid and box.init_pid(cid) != first_pid
        row = wait_ready(client, cid)
        assert row["pid"] == box.init_pid(cid)
        assert client.exec(cid, ["true"])["exit_code"] == 0
    finally:
        box.delete(cid)


def test_supervisor_sigterm_finishes_inflight_then_exits(box, tmp_path):
    sup = Supervisor(box, str(tmp_path))
    cid = box.run("graceful")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, cid)
            rid = c.submit("exec", container=cid, argv=["sh", "-c", "sleep 0.5; echo finished"])
            wait_for(lambda: _in_container(box, cid, "sleep 0.5"), 10, "the exec to start")
            sup.proc.send_signal(signal.SIGTERM)
            reply = c.result(rid, timeout=10)
            assert reply["stdout"] == b"finished\n" and reply["exit_code"] == 0
        assert sup.proc.wait(timeout=10) == 0
    finally:
        sup.stop()
        box.delete(cid)


def test_supervisor_sigkill_leaves_no_worker_behind(box, tmp_path):
    sup = Supervisor(box, str(tmp_path))
    cid = box.run("orphan")
    try:
        with Client(sup.endpoint) as c:
            row = wait_ready(c, cid)
            assert c.exec(cid, ["true"])["exit_code"] == 0
        family = _descendants(sup.proc.pid)
        assert row["worker_pid"] in family and len(family) >= 2  # the zygote and the worker
        sup.proc.kill()
        sup.proc.wait()
        wait_for(lambda: not any(_alive(p) for p in family), 5, "the zygote and the workers to die")
    finally:
        sup.stop()
        box.delete(cid)


def test_attach_any_process(client):
    """`attach NAME --pid PID`: a process of no known runtime becomes an exec target."""
    proc = subprocess.Popen(["unshare", "--uts", "sh", "-c", "hostname attached-box; exec sleep 1000"],
                            stdin=subprocess.DEVNULL)
    try:
        def renamed():
            try:
                return os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep")
            except OSError:
                return False
        wait_for(renamed, 5, "the attached process to be ready")
        client.attach("attached", proc.pid)
        wait_ready(client, "attached")
        r = client.exec("attached", ["hostname"])
        assert r["stdout"] == b"attached-box\n"
        with pytest.raises(WarmexecError) as e:
            client.attach("attached", proc.pid)
        assert e.value.code == errors.EXISTS
        client.detach("attached")
        with pytest.raises(WarmexecError) as e:
            client.exec("attached", ["true"])
        assert e.value.code == errors.NO_SUCH_CONTAINER
    finally:
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def test_paused_container_is_refused_like_runc(box, client, container):
    subprocess.run(["runc", "--root", box.root, "pause", container], check=True)
    try:
        with pytest.raises(WarmexecError) as e:
            client.exec(container, ["true"])
        assert e.value.code == errors.CONTAINER_PAUSED
        assert box.exec(container, ["true"]).returncode != 0  # runc refuses it too
    finally:
        subprocess.run(["runc", "--root", box.root, "resume", container], check=True)
    assert client.exec(container, ["true"])["exit_code"] == 0


def test_python_hooks_run_and_their_failures_stay_inside(box, tmp_path, monkeypatch):
    log = tmp_path / "hook.log"
    monkeypatch.setenv("WARMEXEC_TEST_HOOK_LOG", str(log))
    sup = Supervisor(box, str(tmp_path), '[hooks]\npython = ["tests.system.pyhook:RecordingHook"]\n')
    cid = box.run("pyhook")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, cid)
            r = c.exec(cid, ["sh", "-c", "exit 99"])
            assert r["exit_code"] == 99
            assert c.exec(cid, ["true"])["exit_code"] == 0

        def events():
            lines = log.read_text().splitlines() if log.exists() else []
            return [json.loads(x) for x in lines] if len(lines) >= 4 else None
        docs = wait_for(events, 10, "four hook events")
        mine = [d for d in docs if d["pid"] == r["pid"]]
        assert {d["event"] for d in mine} == {"start", "exit"}
        assert "python exit hook" in sup.read_log()  # the exception was logged, not raised
    finally:
        sup.stop()
        box.delete(cid)


def test_missing_privileges_are_a_clear_error_not_a_partial_join(box, tmp_path):
    """A supervisor without CAP_SYS_ADMIN cannot setns: the container is FATAL at once,
    execs say why, and no namespace was joined half-way (setns with a pidfd is atomic)."""
    cid = box.run("noprivs")
    sup = SupervisorProcess(box.root, str(tmp_path), wrapper=(
        "setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"))
    try:
        with Client(sup.endpoint) as c:
            row = wait_for(lambda: next((r for r in c.list() if r["id"] == cid
                                         and r["state"] == "FATAL"), None), 10, "FATAL")
            assert row["restarts"] == 1 and "Operation not permitted" in row["last_error"]
            with pytest.raises(WarmexecError) as e:
                c.exec(cid, ["true"])
            assert e.value.code == errors.WORKER_UNAVAILABLE
            assert "Operation not permitted" in e.value.message
    finally:
        sup.stop()
        box.delete(cid)


def test_running_out_of_fds_keeps_the_containers_it_has(box, tmp_path):
    """EMFILE while scanning is "unknown", not "no containers": nothing is dropped."""
    cfg = box.config(rlimits=[])  # the workers inherit our low hard limit: ask for no more
    first = box.run("fds-first", cfg)
    sup = SupervisorProcess(box.root, str(tmp_path), metrics=False, scan_interval=0.2,
                            wrapper=("prlimit", "--nofile=48:48", "--"))
    more = []
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, first)
            more = [box.run(f"fds-{i}", cfg) for i in range(10)]  # more than 48 fds serve
            wait_for(lambda: "rescan skipped" in sup.read_log() or "Too many open files" in
                     sup.read_log(), 15, "the supervisor to run out of fds")
            row = _row(c, first)
            assert row["state"] == "READY" and row["restarts"] == 0
            assert c.exec(first, ["true"])["exit_code"] == 0
        assert "container.removed container=" + first not in sup.read_log()
    finally:
        sup.stop()
        for cid in [first, *more]:
            box.delete(cid)


def test_zygote_killed_takes_no_worker_and_a_new_one_forks_the_next(box, tmp_path):
    """A worker lives in its container, tied to the supervisor by its socket alone: the
    zygote's death leaves it serving, and a new zygote forks the next container's."""
    cid = box.run("zygote")
    sup = SupervisorProcess(box.root, str(tmp_path), metrics=False)
    later = None
    try:
        with Client(sup.endpoint) as c:
            row = wait_ready(c, cid)
            zygote = next(p for p in _descendants(sup.proc.pid)
                          if "warmexec.worker.zygote" in open(f"/proc/{p}/cmdline").read())
            os.kill(zygote, signal.SIGKILL)
            wait_for(lambda: "starting a new one" in sup.read_log(), 5, "a new zygote")
            assert c.exec(cid, ["true"])["exit_code"] == 0
            assert _alive(row["worker_pid"]) and _row(c, cid)["worker_pid"] == row["worker_pid"]
            later = box.run("zygote2")
            assert wait_ready(c, later)["state"] == "READY"
            assert c.exec(later, ["true"])["exit_code"] == 0
    finally:
        sup.stop()
        box.delete(cid)
        if later:
            box.delete(later)


def _loop_wakeups(pid: int) -> int:
    """How often the supervisor's loop thread (its main thread) has slept and woken."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def _watched_inodes(pid: int) -> set[int]:
    """Inodes the supervisor's inotify descriptor watches (its fdinfo lists each)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("inotify wd:"):
                        found.add(int(line.split("ino:")[1].split()[0], 16))
        except OSError:
            continue
    return found


def test_runc_exec_into_a_served_container_does_not_wake_the_supervisor(box, client, supervisor):
    """Every `runc exec` (docker exec, ctr exec, the kubelet's probes) writes and deletes
    a file in its container's state directory: a served container's directory is not
    watched, so other tools' execs cost the supervisor nothing; its root still is."""
    cid = box.run("foreign")
    try:
        wait_ready(client, cid)
        pid = supervisor.proc.pid
        watched = _watched_inodes(pid)
        assert os.stat(box.root).st_ino in watched
        assert os.stat(os.path.join(box.root, cid)).st_ino not in watched
        before = _loop_wakeups(pid)
        for _ in range(20):
            assert box.exec(cid, ["true"]).returncode == 0
        woke = _loop_wakeups(pid) - before
        assert woke < 10, f"20 runc execs woke the supervisor's loop {woke} times"
        assert client.exec(cid, ["true"])["exit_code"] == 0
    finally:
        box.delete(cid)
    wait_for(lambda: _row(client, cid) is None, 5, "the deleted container to be dropped")
