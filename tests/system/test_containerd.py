"""warmexec exec on a containerd container gives what `ctr task exec` gives on the same container.

A private containerd (bench/containerdbox.py: Debian's containerd 1.6, its own config,
root, state and sockets, the CRI plugin off) runs `ctr run -d --rootfs` busybox
containers in the namespace warmexec-test; their runc state is under
<dir>/containerd/runc/warmexec-test, where a warmexec supervisor watches and names them
NAMESPACE/ID. Each probe runs once through `ctr task exec` and once through warmexec, on
the same container; ctr's behaviour is the target except where a difference is named
below, with its cause (the supplementary groups of `--user`, ctr's own error messages and
exit code, a default PATH for a spec without env). A host where containerd cannot start
skips these tests with the reason.
"""

from __future__ import annotations

import json

import pytest

from bench.containerdbox import ContainerdBox, ContainerdUnavailable, Result
from warmexec.protocol import Client
from warmexec.supervisor.discovery import DEFAULT_PATH

from .conftest import (
    EXIT_CASES,
    PROBES,
    SupervisorProcess,
    fd_numbers,
    stop_cleanly,
    wait_ready,
    warmexec_cli,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def ctrd():
    try:
        box = ContainerdBox()
    except ContainerdUnavailable as exc:
        pytest.skip(f"no private containerd on this host: {exc}")
    yield box
    box.cleanup()


@pytest.fixture(scope="session")
def ctrd_supervisor(ctrd, tmp_path_factory):
    sup = SupervisorProcess(ctrd.runc_root, str(tmp_path_factory.mktemp("ctrd-sup")),
                            config='docker_host = ""\n')
    yield sup
    stop_cleanly(sup)


@pytest.fixture(scope="session")
def ctrd_client(ctrd_supervisor):
    with Client(ctrd_supervisor.endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def app(ctrd, ctrd_client):
    """`ctr run -d --rootfs ROOTFS app1 sleep 1d` (ctr's default spec: no seccomp), warm."""
    ctrd.run("app1")
    wait_ready(ctrd_client, "app1")
    return "app1"


@pytest.fixture(scope="session")
def confined(ctrd, ctrd_client):
    """The same with `--seccomp` (containerd's default profile), warm."""
    ctrd.run("conf1", "--seccomp")
    wait_ready(ctrd_client, "conf1")
    return "conf1"


def both(ctrd, client, cid, argv, *, user=None, cwd=None) -> tuple[Result, Result]:
    ref = ctrd.exec(cid, argv, user=user, cwd=cwd)
    r = client.exec(f"{ctrd.namespace}/{cid}", argv, user=user, cwd=cwd, timeout=10)
    return ref, Result(r["exit_code"], r["stdout"].decode(), r["stderr"].decode())


def test_cli_by_namespace_and_id(ctrd, ctrd_supervisor, app):
    """`warmexec exec NAMESPACE/ID` (and the bare id, unique here); `ls` names the engine."""
    assert warmexec_cli(ctrd_supervisor, f"{ctrd.namespace}/{app}", "--", "true") == Result(0, "", "")
    assert warmexec_cli(ctrd_supervisor, app, "--", "true") == Result(0, "", "")
    got = warmexec_cli(ctrd_supervisor, f"{ctrd.namespace}/{app}", "--", "cat", "/proc/1/cmdline")
    assert got == Result(0, "sleep\x001d\x00", "")
    listed = warmexec_cli(ctrd_supervisor, "--json", command="ls")
    assert listed.code == 0, listed
    row = next(r for r in json.loads(listed.stdout) if r["id"] == app)
    assert (row["engine"], row["containerd_namespace"]) == ("containerd", ctrd.namespace), row
    assert row["name"] == f"{ctrd.namespace}/{app}", row
    assert row["pid"] == ctrd.init_pid(app)
    table = warmexec_cli(ctrd_supervisor, command="ls")
    assert f"containerd:{ctrd.namespace}" in table.stdout, table


# `ctr task exec --user app` gives app its primary group alone (containerd's oci.WithUser);
# warmexec adds the groups /etc/group lists app in (extra, 2000), as docker exec does and
# as containerd itself does for a container's own user (oci.WithAdditionalGIDs, which its
# CRI plugin applies): one resolution for every engine (docs/PARITY.md).
EXTRA = ",2000(extra)"


def as_ctr_groups(got: Result) -> Result:
    """warmexec's output with the supplementary group ctr's --user leaves out."""
    assert EXTRA in got.stdout, got
    return got._replace(stdout=got.stdout.replace(EXTRA, ""))


@pytest.mark.parametrize("user", [None, "app", "1000", "app:extra", "1000:2000", "nobody", "root", "4242",
                                  "4242:4242"])
def test_id_under_every_user_form(ctrd, ctrd_client, app, user):
    ref, got = both(ctrd, ctrd_client, app, ["id"], user=user)
    assert ref.code == 0, ref
    if user in ("app", "1000"):
        assert ref.stdout == "uid=1000(app) gid=1000(app) groups=1000(app)\n"
        assert got.stdout == "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)\n"
        got = as_ctr_groups(got)
    assert got == ref


@pytest.mark.parametrize("user", [None, "app"])
def test_env(ctrd, ctrd_client, app, user):
    ref, got = both(ctrd, ctrd_client, app, ["env"], user=user)
    assert ref.code == 0, ref
    assert sorted(got.stdout.splitlines()) == sorted(ref.stdout.splitlines())


@pytest.mark.parametrize("cwd", [None, "/tmp"])
def test_workdir(ctrd, ctrd_client, app, cwd):
    ref, got = both(ctrd, ctrd_client, app, ["pwd"], cwd=cwd)
    assert ref == Result(0, (cwd or "/") + "\n", "")
    assert got == ref


# containerd's shim runs with containerd's oom_score_adj + 1 (1 here) and `ctr run` sets
# no process.oomScoreAdj, so the container's init and every `runc exec` the shim starts
# inherit 1; warmexec's joiner takes the init's value when the spec sets none.


@pytest.mark.parametrize("user", [None, "app"])
@pytest.mark.parametrize("probe", sorted(PROBES))
@pytest.mark.parametrize("which", ["app", "confined"])
def test_process_attributes(ctrd, ctrd_client, request, which, probe, user):
    cid = request.getfixturevalue(which)
    ref, got = both(ctrd, ctrd_client, cid, ["sh", "-c", PROBES[probe]], user=user)
    assert ref.code == 0 and ref.stdout, ref
    if probe == "caps-nnp-seccomp":
        assert ("Seccomp:\t2\n" if which == "confined" else "Seccomp:\t0\n") in ref.stdout, ref
    assert got == ref


def test_oom_score_adj_is_the_inits(ctrd, ctrd_client, app):
    """What ctr exec's 1 is: the shim's score, which the container's init inherited too."""
    with open(f"/proc/{ctrd.init_pid(app)}/oom_score_adj") as f:
        init = f.read()
    assert ctrd.exec(app, ["cat", "/proc/self/oom_score_adj"]) == Result(0, init, "")
    assert init == "1\n"


def test_open_fds(ctrd, ctrd_client, app):
    """The same descriptor numbers (what they point at, fifos or pipes, may differ)."""
    ref, got = both(ctrd, ctrd_client, app, ["ls", "-l", "/proc/self/fd"])
    assert ref.code == 0 and fd_numbers(ref), ref
    assert fd_numbers(got) == fd_numbers(ref), (ref.stdout, got.stdout)


@pytest.mark.parametrize("script,code", EXIT_CASES)
def test_exit_codes_and_signals(ctrd, ctrd_client, app, script, code):
    ref, got = both(ctrd, ctrd_client, app, ["sh", "-c", script])
    assert ref.code == code
    assert got.code == ref.code


# ctr exits 1 for every failure, its own or the runtime's, and prints the runtime's error
# wrapped ("ctr: OCI runtime exec failed: exec failed: unable to start container process:
# ... : unknown"); warmexec exits as docker exec does (127 missing, 126 cannot invoke) with
# the same words of runc's error, and docker's words for an unknown user, where ctr's own
# lookup says "no users found".
FAILURES = {
    "missing-executable": (None, ["nonexistent"], 'exec: "nonexistent": executable file not found in $PATH',
                           127, None),
    "not-executable": (None, ["/bin/notexec"], 'exec: "/bin/notexec": permission denied', 126, None),
    "unknown-user": ("nosuchuser", ["id"], "ctr: no users found", 126,
                     "unable to find user nosuchuser: no matching entries in passwd file"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_as_the_cli_shows_them(ctrd, ctrd_supervisor, app, case):
    user, argv, words, code, own_words = FAILURES[case]
    ref = ctrd.exec(app, argv, user=user)
    assert (ref.code, ref.stdout) == (1, "") and words in ref.stderr, ref
    got = warmexec_cli(ctrd_supervisor, *(["-u", user] if user else []), f"{ctrd.namespace}/{app}", "--",
                       *argv)
    assert (got.code, got.stdout) == (code, ""), got
    assert (own_words or words) in got.stderr, got


def test_container_started_with_options(ctrd, ctrd_client):
    """`ctr run --cwd --env --cap-add --cap-drop`: the container's own process settings
    are the defaults of an exec, through ctr and through warmexec alike."""
    ctrd.run("opts1", "--cwd", "/tmp", "--env", "MODE=opts", "--cap-add", "CAP_SYS_PTRACE",
             "--cap-drop", "CAP_NET_RAW")
    try:
        wait_ready(ctrd_client, "opts1")
        script = f"id; pwd; env | sort; {PROBES['caps-nnp-seccomp']}"
        ref, got = both(ctrd, ctrd_client, "opts1", ["sh", "-c", script])
        assert ref.code == 0 and "MODE=opts" in ref.stdout and "/tmp\n" in ref.stdout, ref
        assert got == ref
        ref, got = both(ctrd, ctrd_client, "opts1", ["sh", "-c", script], user="app")
        assert as_ctr_groups(got) == ref
    finally:
        ctrd.remove("opts1")


def test_container_without_path(ctrd, ctrd_client):
    """`ctr run --rootfs` with no --env gives the process no environment at all: ctr exec
    gets HOME alone and runc finds no bare command name (Go's LookPath searches an empty
    PATH). warmexec differs: a spec without env gets a default PATH (supervisor/
    discovery.py DEFAULT_PATH), so the exec has it and a bare name is found."""
    ctrd.run("bare1", env=(), command=("/bin/sleep", "1d"))
    try:
        wait_ready(ctrd_client, "bare1")
        ref, got = both(ctrd, ctrd_client, "bare1", ["/bin/env"])
        assert ref == Result(0, "HOME=/root\n", "")
        assert got == Result(0, f"{DEFAULT_PATH}\nHOME=/root\n", "")
        ref, got = both(ctrd, ctrd_client, "bare1", ["env"])
        assert ref.code == 1 and 'exec: "env": executable file not found in $PATH' in ref.stderr, ref
        assert got == Result(0, f"{DEFAULT_PATH}\nHOME=/root\n", "")
    finally:
        ctrd.remove("bare1")
