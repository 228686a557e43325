"""Parity, part two: user-namespaced containers and the OOM killer."""

from __future__ import annotations

import pytest

from .conftest import wait_ready
from .test_parity import PROBE

pytestmark = pytest.mark.root

USERNS_PROBE = PROBE + r"""
echo '# maps'; cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups
echo '# files'; ls -ln /home | awk '{print $1, $3, $4, $9}'; touch /home/alice/probe-$$ 2>&1 | sed 's/-[0-9]*:/:/'; echo "touch=$?"
"""


@pytest.fixture(scope="module")
def userns_container(box, client):
    cid = box.run("userns", userns_base=200000)
    wait_ready(client, cid)
    yield cid
    box.delete(cid)


@pytest.mark.parametrize("runc_user, we_user", [
    (None, None),  # the container's own user: root *inside* the namespace, not 65534
    ("1000:1000", "1000:1000"),
    ("1001:1001", "bob"),
])
def test_user_namespace_matches_runc(box, client, userns_container, runc_user, we_user):
    # docker's groups for a request's user: the primary gid first, then those listing it
    kw = {"user": runc_user, "additional_gids": {None: [], "bob": [1001, 29]}.get(we_user, [1000])}
    ref = box.exec(userns_container, ["sh", "-c", USERNS_PROBE], **kw)
    assert ref.returncode == 0, ref.stderr
    got = client.exec(userns_container, ["sh", "-c", USERNS_PROBE], user=we_user)
    out = got["stdout"].decode()
    assert "0     200000      65536" in out.split("# maps")[1]
    if we_user is None:
        assert "uid=0(root) gid=0(root)" in out
    assert out == ref.stdout.decode()


def test_oom_killed_exec_is_reported(box, client):
    cfg = box.config()
    cfg["linux"]["resources"]["memory"] = {"limit": 64 << 20, "swap": 64 << 20}
    cid = box.run("oom", cfg)
    try:
        wait_ready(client, cid)
        r = client.exec(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"])
        assert r["signal"] == 9 and r["exit_code"] == 137
        assert r["oom_killed"] is True and r["timed_out"] is False
        ok = client.exec(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=1"])
        assert ok["exit_code"] == 0 and ok["oom_killed"] is False
        # A SIGKILL that is not the OOM killer's is not reported as one.
        r = client.exec(cid, ["sh", "-c", "kill -KILL $$"])
        assert r["signal"] == 9 and r["oom_killed"] is False
    finally:
        box.delete(cid)
