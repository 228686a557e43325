"""What an exec'd process gets from warmexec equals what `runc exec` gives it.

Each case runs one probe script in the same container both ways and compares the
output line for line: credentials, capabilities, namespaces, cgroups, env, cwd,
hostname, rlimits, umask, oom_score_adj, open fds and session keyring.
"""

from __future__ import annotations

import re

import pytest

from warmexec.protocol.caps import CAP_NAMES

from .conftest import wait_ready

pytestmark = pytest.mark.root

PROBE = r"""
grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Umask|Seccomp|Seccomp_filters):' /proc/self/status
echo '# cgroup'; cat /proc/self/cgroup
echo '# ns'; for n in cgroup ipc mnt net pid pid_for_children time time_for_children user uts; do
  echo "$n $(readlink /proc/self/ns/$n)"; done
echo '# env'; env | grep -v -E '^(PWD|SHLVL|_)=' | sort
echo '# cwd'; pwd
echo '# hostname'; hostname
echo '# limits'; cat /proc/self/limits
echo '# oom'; cat /proc/self/oom_score_adj
echo '# fds'; ls /proc/self/fd
echo '# keyring'; awk '$9 ~ /^_ses/ {print $1, $8, $9}' /proc/keys
echo '# id'; id
"""


def both(box, client, cid, *, runc_kw=None, we_kw=None):
    ref = box.exec(cid, ["sh", "-c", PROBE], **(runc_kw or {}))
    assert ref.returncode == 0, ref.stderr
    got = client.exec(cid, ["sh", "-c", PROBE], **(we_kw or {}))
    assert got["exit_code"] == 0, got["stderr"]
    return ref.stdout.decode(), got["stdout"].decode()


def test_default_process(box, client, container):
    ref, got = both(box, client, container)
    assert "NoNewPrivs:\t1" in got and "CapBnd:\t0000000020000420" in got
    assert got == ref


def test_named_user_gets_docker_groups(box, client, container):
    """Docker's groups: the primary group first, then those that list the user."""
    ref, got = both(box, client, container,
                    runc_kw={"user": "1000:1000", "additional_gids": [1000, 10, 29]},
                    we_kw={"user": "alice"})
    assert "uid=1000(alice) gid=1000(alice) groups=10(wheel),29(audio),1000(alice)" in got  # sorted by the kernel
    assert "HOME=/home/alice" in got
    assert got == ref


def test_numeric_user_and_named_group(box, client, container):
    ref, got = both(box, client, container, runc_kw={"user": "1001:29", "additional_gids": [29]},
                    we_kw={"user": "bob:audio"})
    assert "uid=1001(bob) gid=29(audio) groups=29(audio)" in got
    assert got == ref


def test_unknown_uid_is_taken_as_is(box, client, container):
    ref, got = both(box, client, container, runc_kw={"user": "4242:4242", "additional_gids": [4242]},
                    we_kw={"user": "4242:4242"})
    assert "HOME=/" in got
    assert got == ref


def test_env_and_cwd_overrides(box, client, container):
    env = {"FOO": "bar baz", "PATH": "/bin:/usr/bin", "TERM": "dumb"}
    ref, got = both(box, client, container, runc_kw={"env": env, "cwd": "/tmp"},
                    we_kw={"env": env, "cwd": "/tmp"})
    assert "FOO=bar baz" in got and "# cwd\n/tmp\n" in got
    assert got == ref


def test_configured_process(box, client):
    """A container whose process section sets every attribute runc exec applies."""
    caps = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID"]
    cfg = box.config(
        user={"uid": 1000, "gid": 1000, "additionalGids": [10]},
        env=["PATH=/bin", "APP=configured", "HOME=/home/alice"], cwd="/home/alice",
        capabilities={"bounding": caps, "effective": caps[:2], "permitted": caps[:3],
                      "inheritable": caps[:2], "ambient": caps[:2]},
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 4096, "hard": 8192},
                 {"type": "RLIMIT_NPROC", "soft": 512, "hard": 512},
                 {"type": "RLIMIT_CORE", "soft": 0, "hard": 1048576}],
        noNewPrivileges=False, oomScoreAdj=100)
    cid = box.run("configured", cfg)
    try:
        wait_ready(client, cid)
        ref, got = both(box, client, cid)
        assert "CapAmb:\t0000000000000021" in got and "NoNewPrivs:\t0" in got
        assert "Max open files            4096                 8192" in got
        assert "# oom\n100\n" in got
        # runc 1.1's own init (a Go program) races the Go runtime's raising of the soft
        # NOFILE limit to the hard one, so runc exec shows 4096 or 8192 there; warmexec
        # gives the configured 4096 every time. Every other line must match.
        nofile = re.compile(r"^Max open files .*$", re.M)
        assert nofile.sub("", got) == nofile.sub("", ref)
    finally:
        box.delete(cid)


def test_cpu_and_address_space_limits(box, client):
    """rlimits a Python spawner cannot live under go through the fork-per-exec path."""
    cfg = box.config(rlimits=[{"type": "RLIMIT_CPU", "soft": 30, "hard": 60},
                              {"type": "RLIMIT_AS", "soft": 1 << 30, "hard": 1 << 30}])
    cid = box.run("limits", cfg)
    try:
        wait_ready(client, cid)
        ref, got = both(box, client, cid)
        assert "Max cpu time              30                   60" in got
        assert got == ref
        assert client.exec(cid, ["nonexistent"])["exit_code"] == 127
    finally:
        box.delete(cid)


def test_privileged_has_every_capability(box, client, container):
    # Every capability this host lets a process have (the sandbox may withhold some).
    every = [n for i, n in enumerate(CAP_NAMES) if _own_bounding() >> i & 1]
    proc = box.bundle_config(container)["process"]
    proc.update(args=["sh", "-c", PROBE],
                capabilities={"bounding": every, "effective": every, "permitted": every})
    ref = box.exec(container, [], process=proc)
    assert ref.returncode == 0, ref.stderr
    got = client.exec(container, ["sh", "-c", PROBE], privileged=True)
    assert f"CapEff:\t{_own_bounding():016x}" in got["stdout"].decode()
    assert got["stdout"].decode() == ref.stdout.decode()


def _own_bounding() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
