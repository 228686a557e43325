"""Parity, part two: the container's seccomp profile applies to every exec as runc applies it."""

from __future__ import annotations

import ctypes
import os

import pytest

from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError
from warmexec.worker import seccomp

from .conftest import Supervisor, wait_for, wait_ready
from .test_parity import PROBE

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(seccomp._lib is None, reason="libseccomp is not installed")]

SECCOMP_PROBE = PROBE + r"""
echo '# seccomp'; mkdir /tmp/probe-dir 2>/dev/null; echo "mkdir=$?"
sh -c 'kill -HUP $$ 2>/dev/null; echo survived-hup'; echo "killhup=$?"
sh -c 'kill -TERM $$; echo survived-term'; echo "killterm=$?"
"""
DENY_MKDIR = {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
# kill(pid, SIGHUP) refused: a condition on one argument
DENY_HUP = {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
            "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_EQ"}]}


def all_syscalls() -> list[str]:
    lib, native, names = seccomp._lib, seccomp._lib.seccomp_arch_native(), []
    for nr in range(1024):
        ptr = lib.seccomp_syscall_resolve_num_arch(native, nr)
        if ptr:
            names.append(ctypes.string_at(ptr).decode())
    return names


def denylist() -> dict:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [DENY_MKDIR, DENY_HUP]}


def allowlist(last: str = "openat2") -> dict:
    """Docker-default shaped: deny by default, allow a long list (all but mkdir, and
    everything above last, which then gets ENOSYS as under runc)."""
    keep = [n for n in all_syscalls() if n not in ("mkdir", "mkdirat", "kill")]
    keep = keep[: keep.index(last) + 1] if last in keep else keep
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": keep, "action": "SCMP_ACT_ALLOW"},
                         # kill allowed unless its signal is SIGHUP: a condition on one argument
                         {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_NE"}]}]}


def allowlist_before_pidfds() -> dict:
    """An allow-list written before Linux 5.3: no pidfd_open, clone3 and later (ENOSYS),
    which the worker, running under the filter, must do without."""
    return allowlist("io_uring_register")


@pytest.mark.parametrize("profile, nnp", [(denylist, True), (allowlist, True), (allowlist, False),
                                          (allowlist_before_pidfds, True)],
                         ids=["denylist", "allowlist", "allowlist-without-nnp", "allowlist-before-pidfds"])
def test_seccomp_matches_runc(box, client, profile, nnp):
    cfg = box.config(noNewPrivileges=nnp)
    cfg["linux"]["seccomp"] = profile()
    cid = box.run(f"seccomp-{profile.__name__}-{nnp}", cfg)
    try:
        wait_ready(client, cid)
        ref = box.exec(cid, ["sh", "-c", SECCOMP_PROBE])
        got = client.exec(cid, ["sh", "-c", SECCOMP_PROBE])
        out = got["stdout"].decode()
        assert "Seccomp:\t2" in out and "Seccomp_filters:\t1" in out
        tail = out.split("# seccomp")[1]
        assert "mkdir=1" in tail and "killterm=143" in tail
        assert "survived-hup\nkillhup=0" in tail  # kill(pid, SIGHUP) refused: the shell lived on
        assert out == ref.stdout.decode()
        assert client.exec(cid, ["true"])["exit_code"] == 0
        r = client.exec(cid, ["sh", "-c", "echo $$"])  # the container pid, either way
        assert int(r["stdout"]) == r["container_pid"]
        assert client.exec(cid, ["sleep", "5"], timeout=0.2)["timed_out"]  # killed, reaped
    finally:
        box.delete(cid)


def test_profile_that_cannot_be_read_fails_closed(box, tmp_path):
    """The bundle is gone, so the profile cannot be rebuilt: refuse, never run unconfined."""
    cfg = box.config()
    cfg["linux"]["seccomp"] = denylist()
    cid = box.run("seccomp-gone", cfg)
    bundle = os.path.join(box.dir, "bundles", cid)
    os.rename(os.path.join(bundle, "config.json"), os.path.join(bundle, "config.json.away"))
    sup = Supervisor(box, str(tmp_path))
    try:
        with Client(sup.endpoint) as c:
            row = wait_for(lambda: next((r for r in c.list() if r["id"] == cid
                                         and r["state"] == "FATAL"), None), 10, "FATAL")
            assert row["restarts"] == 1 and "seccomp" in row["last_error"]  # no retry loop
            with pytest.raises(WarmexecError) as e:
                c.exec(cid, ["true"])
            assert e.value.code == errors.WORKER_UNAVAILABLE and "seccomp" in e.value.message
    finally:
        sup.stop()
        os.rename(os.path.join(bundle, "config.json.away"), os.path.join(bundle, "config.json"))
        box.delete(cid)
