"""warmexec exec on a Docker container gives what docker exec gives on the same container.

A private dockerd (bench/dockerbox.py: Debian's docker.io, its own data root, exec root,
socket and containerd) runs the containers; a warmexec supervisor watches its runc root.
Each probe runs once through `docker exec` and once through warmexec, on the same
container, and the outputs must be equal: docker's behaviour is the target. A host where
the daemon cannot start skips these tests with the reason.

The image's /etc/passwd has app:x:1000:1000 and its /etc/group extra:x:2000:app, the case
where docker adds the primary gid to the supplementary groups (CVE-2022-36109).
"""

from __future__ import annotations

import re

import pytest

from bench.dockerbox import Result
from warmexec.protocol import Client

from .conftest import (
    EXIT_CASES,
    PROBES,
    SupervisorProcess,
    fd_numbers,
    stop_cleanly,
    wait_for,
    wait_ready,
    warmexec_cli,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def docker_supervisor(docker, tmp_path_factory):
    sup = SupervisorProcess(docker.runc_root, str(tmp_path_factory.mktemp("docker-sup")),
                            config=f'docker_host = "{docker.host}"\n')
    yield sup
    stop_cleanly(sup)


@pytest.fixture(scope="session")
def docker_client(docker_supervisor):
    with Client(docker_supervisor.endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def app(docker, docker_client):
    """A plain `docker run -d --name app1 IMAGE sleep 1d`, warm; its full id."""
    cid = docker.run("app1")
    wait_ready(docker_client, cid)
    return cid


def both(docker, client, cid, argv, *, user=None, env=None, cwd=None) -> tuple[Result, Result]:
    ref = docker.exec(cid, argv, user=user, env=env, cwd=cwd)
    r = client.exec(cid, argv, user=user, env=env, cwd=cwd, timeout=10)
    return ref, Result(r["exit_code"], r["stdout"].decode(), r["stderr"].decode())


@pytest.mark.parametrize("user", [None, "app", "1000", "app:extra", "1000:2000", "nobody", "root"])
def test_id_under_every_user_form(docker, docker_client, app, user):
    ref, got = both(docker, docker_client, app, ["id"], user=user)
    assert ref.code == 0, ref
    if user in ("app", "1000"):  # the primary group is among the supplementary ones
        assert ref.stdout == "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)\n"
    assert got == ref


@pytest.mark.parametrize("env,user", [(None, None), ({"K": "V"}, None),
                                      ({"PATH": "/bin", "HOME": "/x"}, None), (None, "app")],
                         ids=["plain", "K=V", "PATH-HOME", "app"])
def test_env(docker, docker_client, app, env, user):
    ref, got = both(docker, docker_client, app, ["env"], env=env, user=user)
    assert ref.code == 0, ref
    assert sorted(got.stdout.splitlines()) == sorted(ref.stdout.splitlines())


@pytest.mark.parametrize("cwd", [None, "/tmp"])
def test_workdir(docker, docker_client, app, cwd):
    ref, got = both(docker, docker_client, app, ["pwd"], cwd=cwd)
    assert ref == Result(0, (cwd or "/") + "\n", "")
    assert got == ref


@pytest.mark.parametrize("user", [None, "app"])
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_process_attributes(docker, docker_client, app, probe, user):
    ref, got = both(docker, docker_client, app, ["sh", "-c", PROBES[probe]], user=user)
    assert ref.code == 0 and ref.stdout, ref
    assert got == ref


def test_open_fds(docker, docker_client, app):
    """The same descriptor numbers (what they point at, pipes or sockets, may differ)."""
    ref, got = both(docker, docker_client, app, ["ls", "-l", "/proc/self/fd"])
    assert ref.code == 0 and fd_numbers(ref), ref
    assert fd_numbers(got) == fd_numbers(ref), (ref.stdout, got.stdout)


@pytest.mark.parametrize("script,code", EXIT_CASES)
def test_exit_codes_and_signals(docker, docker_client, app, script, code):
    ref, got = both(docker, docker_client, app, ["sh", "-c", script])
    assert ref.code == code
    assert got.code == ref.code


# docker exec's failures as its CLI shows them. docker 20.10 prints them on stdout
# (docker/cli#2025, open: "should go to stderr"); warmexec must print the same words on
# stderr and nothing on stdout.
FAILURES = {
    "missing-executable": (None, ["nonexistent"], 'exec: "nonexistent": executable file not found in $PATH'),
    "not-executable": (None, ["/bin/notexec"], 'exec: "/bin/notexec": permission denied'),
    "unknown-user": ("nosuchuser", ["id"],
                     "unable to find user nosuchuser: no matching entries in passwd file"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_as_the_cli_shows_them(docker, docker_supervisor, app, case):
    user, argv, words = FAILURES[case]
    ref = docker.exec(app, argv, user=user)
    assert words in ref.stdout + ref.stderr, ref
    got = warmexec_cli(docker_supervisor, *(["-u", user] if user else []), app, "--", *argv)
    # docker 20.10 exits 126 for every exec that fails to start, a missing executable
    # too (moby#45795, which calls it a bug: the daemon overwrites the 127 it computed).
    # warmexec keeps 127 there, as runc exec, a shell and docker's own intent have it
    # (docs/PARITY.md); every other code is docker's.
    code = 127 if case == "missing-executable" else ref.code
    assert (got.code, got.stdout) == (code, ""), got
    assert words in got.stderr, got


def test_container_started_with_options(docker, docker_client):
    """`docker run -u -e -w --cap-add`: the container's own process settings are the
    defaults of an exec, through docker and through warmexec alike."""
    cid = docker.run("opts1", "-u", "app", "-e", "MODE=opts", "-w", "/tmp", "--cap-add", "SYS_PTRACE",
                     "--cap-drop", "NET_RAW")
    try:
        wait_ready(docker_client, cid)
        script = f"id; pwd; env | sort; {PROBES['caps-nnp-seccomp']}"
        ref, got = both(docker, docker_client, cid, ["sh", "-c", script])
        assert ref.code == 0 and "uid=1000(app)" in ref.stdout and "MODE=opts" in ref.stdout, ref
        assert got == ref
        ref, got = both(docker, docker_client, cid, ["sh", "-c", script], user="root")
        assert got == ref
    finally:
        docker.remove(cid)


def test_names_and_prefixes(docker, docker_supervisor, docker_client, app):
    """By docker name and by the 12-char id `docker ps` shows, as docker exec accepts them;
    an ambiguous prefix is an error that names the matches."""
    wait_for(lambda: any(r["id"] == app and r.get("name") == "app1" for r in docker_client.list()), 10,
             "the supervisor to learn app1's name")
    assert warmexec_cli(docker_supervisor, "app1", "--", "true") == Result(0, "", "")
    assert warmexec_cli(docker_supervisor, app[:12], "--", "true") == Result(0, "", "")
    # Two containers whose ids share a first character (at most 17 ids for 16 digits).
    extra, seen = [], {app[0]: app}
    try:
        while True:
            cid = docker.run(f"prefix{len(extra)}", command=("sleep", "1d"))
            extra.append(cid)
            if cid[0] in seen:
                break
            seen[cid[0]] = cid
        pair = (seen[cid[0]], cid)
        for c in pair:
            wait_ready(docker_client, c)
        assert docker.exec(cid[0], ["true"]).code != 0  # docker refuses it too
        got = warmexec_cli(docker_supervisor, cid[0], "--", "true")
        assert got.code == 125, got
        names = {c: docker.inspect(c)["Name"].lstrip("/") for c in pair}
        for c in pair:
            assert c[:12] in got.stderr or re.search(rf"\b{names[c]}\b", got.stderr), got
    finally:
        docker.remove(*extra)


def test_names_follow_rename_and_restart(docker, docker_supervisor, docker_client):
    """`docker rename` and `docker restart` (same id, a new init) keep the name working."""
    cid = docker.run("mover1")
    try:
        wait_ready(docker_client, cid)
        wait_for(lambda: warmexec_cli(docker_supervisor, "mover1", "--", "true").code == 0, 10, "mover1")
        docker.docker("rename", "mover1", "mover2")
        wait_for(lambda: warmexec_cli(docker_supervisor, "mover2", "--", "true").code == 0, 10, "mover2")
        assert warmexec_cli(docker_supervisor, "mover1", "--", "true").code == 125
        docker.docker("restart", "-t", "0", "mover2")
        pid = docker.inspect(cid)["State"]["Pid"]
        wait_for(lambda: any(r["id"] == cid and r["pid"] == pid and r["state"] == "READY"
                             for r in docker_client.list()), 15, "a worker for the restarted init")
        got = warmexec_cli(docker_supervisor, "mover2", "--", "cat", "/proc/1/cmdline")
        assert got == Result(0, "sleep\x001d\x00", "")
    finally:
        docker.remove(cid)
