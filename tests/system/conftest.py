"""Fixtures: real runc containers under a private root, real supervisor processes.

No mocks on the exec path. Waits are on conditions with deadlines, never bare sleeps.

`supervisor`, `client` and `container` take the default path: no hooks and no event
stream, so a quick exec's start travels with its exit. `hooked_supervisor`,
`hooked_client` and `hooked_container` are the same with a start and an exit hook (the
supervisor then asks workers to announce every start), for the tests of hooks and their
metrics. Both supervisors watch the same RuncBox root: each container there has a worker
of each once both have started.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.dockerbox import DockerBox, DockerUnavailable
from bench.enginebox import Result
from bench.harness import SupervisorProcess, free_port, wait_for, wait_ready  # noqa: F401 - re-exported
from bench.runcbox import RuncBox
from warmexec.protocol import Client

from ..conftest import REPO  # noqa: F401 - re-exported


class Supervisor(SupervisorProcess):
    """The harness's supervisor with a hooks directory for the hook tests.

    Its periodic rescan is an hour apart: every container the tests start is found
    through inotify alone, so the tests prove that path.
    """

    def __init__(self, box: RuncBox, workdir: str, config: str = "") -> None:
        self.hook_dir = os.path.join(workdir, "hooks")
        os.makedirs(self.hook_dir, exist_ok=True)
        super().__init__(box.root, workdir, config, scan_interval=3600)


HOOK_SCRIPT = """import json, sys, os
doc = json.load(sys.stdin)
try:  # the host's view of the pid, while the process may still run
    with open("/proc/%s/status" % doc["pid"]) as f:
        doc["nspid"] = [l.split()[1:] for l in f if l.startswith("NSpid:")][0]
except (OSError, IndexError, TypeError):
    doc["nspid"] = None
name = "%s-%s.json" % (sys.argv[1], doc["exec_id"])
with open(os.path.join(sys.argv[2], name), "w") as f:
    json.dump(doc, f)
"""


NS = "cgroup ipc mnt net pid pid_for_children time time_for_children user uts"

# Shell probes of an exec'd process's attributes, compared line for line with an
# engine's own exec (test_docker.py, test_containerd.py).
PROBES = {
    "caps-nnp-seccomp": r"grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Seccomp_filters):' "
                        "/proc/self/status",
    "cgroup": "cat /proc/self/cgroup",
    "ulimit": "ulimit -a",
    "limits": "cat /proc/self/limits",
    "hostname": "hostname",
    "namespaces": f'for n in {NS}; do echo "$n $(readlink /proc/self/ns/$n)"; done',
    "umask": "umask",
    "oom_score_adj": "cat /proc/self/oom_score_adj",
}


# Scripts and the exit codes an engine's exec and warmexec's must both give.
EXIT_CASES = [("exit 3", 3), ("kill -9 $$", 137), ("kill -15 $$", 143)]


def fd_numbers(r: Result) -> set[str]:
    """The descriptor numbers in `ls -l /proc/self/fd` (what they point at may differ)."""
    return {line.split()[-3] for line in r.stdout.splitlines() if " -> " in line}


def warmexec_cli(sup: SupervisorProcess, *args: str, command: str = "exec") -> Result:
    """The warmexec CLI (`warmexec COMMAND --endpoint ... ARGS`) against sup."""
    r = subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", command, "--endpoint", sup.endpoint,
                        *args], capture_output=True, text=True, timeout=30, env=dict(os.environ))
    return Result(r.returncode, r.stdout, r.stderr)


def stop_cleanly(sup: SupervisorProcess) -> None:
    assert sup.stop() == 0
    assert "internal error" not in sup.read_log(), "the supervisor logged an internal error"


@pytest.fixture(scope="session")
def box():
    b = RuncBox()
    yield b
    b.cleanup()


@pytest.fixture(scope="session")
def supervisor(box, tmp_path_factory):
    """The default path: no hooks, no event stream."""
    sup = Supervisor(box, str(tmp_path_factory.mktemp("sup")))
    yield sup
    stop_cleanly(sup)


@pytest.fixture(scope="session")
def client(supervisor):
    with Client(supervisor.endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def container(box, client):
    """The default busybox container (runc spec defaults), warm."""
    cid = box.run("default")
    wait_ready(client, cid)
    return cid


# The hooked supervisor's one scheduled probe, only in a container named dash-probed
# (the dashboard_probed fixture): a failing run outlasting its period, so that every
# panel of the dashboard's Probes row has samples (a failure, a change, a skipped tick).
DASHBOARD_PROBE = """
[[probes]]
name = "dashboard"
argv = ["sh", "-c", "sleep 0.7; exit 1"]
containers = ["*-dash-probed"]
period = 0.5
failure_threshold = 1
"""


@pytest.fixture(scope="session")
def hooked_supervisor(box, tmp_path_factory):
    """A start and an exit hook that write each event, with the command's NSpid, as
    hook_dir/start-<exec id>.json and hook_dir/exit-<exec id>.json; DASHBOARD_PROBE."""
    workdir = str(tmp_path_factory.mktemp("hooked-sup"))
    hook = os.path.join(workdir, "hook.py")
    with open(hook, "w") as f:
        f.write(HOOK_SCRIPT)
    hooks_dir = os.path.join(workdir, "hooks")
    cfg = (f'[[hooks.start]]\ncommand = ["{sys.executable}", "{hook}", "start", "{hooks_dir}"]\n'
           f'timeout = 10\n'
           f'[[hooks.exit]]\ncommand = ["{sys.executable}", "{hook}", "exit", "{hooks_dir}"]\n'
           + DASHBOARD_PROBE)
    sup = Supervisor(box, workdir, cfg)
    yield sup
    stop_cleanly(sup)


@pytest.fixture(scope="session")
def hooked_client(hooked_supervisor):
    with Client(hooked_supervisor.endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def hooked_container(container, hooked_client):
    """The default container, warm in the hooked supervisor too."""
    wait_ready(hooked_client, container)
    return container


@pytest.fixture
def dashboard_probed(box, hooked_client):
    """A container the hooked supervisor's DASHBOARD_PROBE runs in, for the test's length."""
    cid = box.run("dash-probed")
    wait_ready(hooked_client, cid)
    yield cid
    box.delete(cid)


@pytest.fixture(scope="session")
def docker():
    """A private dockerd (bench/dockerbox.py) for the session; skipped where none can run."""
    try:
        box = DockerBox()
    except DockerUnavailable as exc:
        pytest.skip(f"no private dockerd on this host: {exc}")
    yield box
    box.cleanup()


class CurveSupervisor:
    """`warmexec serve` on tcp://127.0.0.1 with CurveZMQ, its keys made with `warmexec
    keygen`: `server`, the authorised keys (`monitor` with the ACL given as TOML lines,
    `admin` with none: everything) and unauthorised ones."""

    def __init__(self, box: RuncBox, keys: str, monitor_acl: str, strangers: tuple[str, ...] = ()) -> None:
        import zmq.auth

        self._load = zmq.auth.load_certificate
        self.keys = keys
        clients = os.path.join(keys, "clients")
        os.makedirs(clients)
        for name in ("server", "monitor", "admin", *strangers):
            subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", "keygen", keys, name],
                           check=True, capture_output=True)
        for name in ("monitor", "admin"):
            os.rename(os.path.join(keys, f"{name}.key"), os.path.join(clients, f"{name}.key"))
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = os.path.join(keys, "warmexec.toml")
        with open(config, "w") as f:
            f.write(f'endpoint = "{self.endpoint}"\n'
                    f'[auth]\nserver_key = "{keys}/server.key_secret"\nclients_dir = "{clients}"\n'
                    f'[acl.monitor]\n{monitor_acl}\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "serve", "--runc-root",
                                      box.root, "--config", config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, name: str) -> Client:
        return Client(self.endpoint, server_key=os.path.join(self.keys, "server.key"),
                      client_key=os.path.join(self.keys, f"{name}.key_secret"))

    def key(self, name: str) -> tuple[bytes, bytes, bytes]:
        """(server public, name's public, name's secret)."""
        server, _ = self._load(os.path.join(self.keys, "server.key"))
        public, secret = self._load(os.path.join(self.keys, f"{name}.key_secret"))
        return server, public, secret

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=20)
