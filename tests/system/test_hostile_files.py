"""A hostile container's /etc/passwd and /etc/group, against real runc containers.

The container's root controls the files a new worker reads to resolve the exec's user.
Whatever it puts there (a FIFO, a symlink to a device, a directory, a huge file, ids of
2^31 and more), each exec gets a clear error reply well within a deadline, never a
hang and never a more privileged user, and the supervisor keeps answering another
container's execs at once. Only the public client API is used.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from warmexec.protocol import errors
from warmexec.protocol.errors import WarmexecError

from .conftest import wait_for, wait_ready

pytestmark = pytest.mark.root

#: A worker that never gets ready is killed after 10 s: a clear answer must come well
#: before that, from the joiner refusing the file itself.
DEADLINE = 5.0
MAX_FILE = 4 << 20  # users.MAX_FILE
RANGE = "must be in range 0-2147483647"


def rootfs(box, cid: str) -> str:
    return os.path.join(box.dir, "bundles", cid, "rootfs")


def refusal(client, healthy: str, cid: str, user: str | None) -> WarmexecError:
    """Submit an exec as user and, while it is answered, check that another container's
    exec is answered at once; return the error the exec got (fail if it ran or hung)."""
    rid = client.submit("exec", container=cid, argv=["id"], user=user, timeout=30)
    t0 = time.monotonic()
    assert client.exec(healthy, ["true"], timeout=5)["exit_code"] == 0
    assert time.monotonic() - t0 < 1.0, "another container's exec waited"
    try:
        r = client.result(rid, timeout=DEADLINE - (time.monotonic() - t0))
    except WarmexecError as exc:
        assert "no reply within" not in exc.message, f"exec as {user}: no answer within {DEADLINE}s"
        return exc
    raise AssertionError(f"exec as {user} ran: exit {r['exit_code']}, {r['stdout']!r}")


def make_fifo(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)


def make_ptmx_link(path: str) -> None:
    os.unlink(path)
    os.symlink("/dev/ptmx", path)


def make_dir(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)


@pytest.mark.parametrize("name, make, kind", [
    ("passwd", make_fifo, "a FIFO"),
    ("group", make_fifo, "a FIFO"),
    ("passwd", make_ptmx_link, "a character device"),
    ("passwd", make_dir, "a directory"),
])
def test_a_user_file_that_is_not_a_regular_file_is_a_clear_error(box, client, container, name, make, kind):
    """Replaced while the container runs: the next worker (a new user) reads it."""
    cid = box.run(f"etc-{name}-{make.__name__}")
    try:
        wait_ready(client, cid)
        make(os.path.join(rootfs(box, cid), "etc", name))
        for user in ("alice", "0", "1000:10"):
            exc = refusal(client, container, cid, user)
            assert exc.code == errors.SPAWN_FAILED, exc
            assert f"/etc/{name} is {kind}, not a regular file" in exc.message, exc
        assert client.exec(cid, ["true"], timeout=5)["exit_code"] == 0  # its warm worker serves on
    finally:
        box.delete(cid)


def test_the_containers_own_worker_meeting_a_fifo_passwd_answers_every_exec(box, client, container):
    """The container puts a FIFO in place of /etc/passwd and kills its own worker (a
    process of the container): the worker started in its place meets the FIFO. (A
    container cannot be created with it: `runc run` itself hangs on it.)"""
    cid = box.run("etc-fifo-own")
    try:
        pid = wait_ready(client, cid)["worker_pid"]
        make_fifo(os.path.join(rootfs(box, cid), "etc", "passwd"))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: next(r for r in client.list() if r["id"] == cid)["worker_pid"] != pid, 10,
                 "the killed worker to be noticed")
        for user in (None, "alice"):
            exc = refusal(client, container, cid, user)
            assert exc.code in (errors.SPAWN_FAILED, errors.WORKER_UNAVAILABLE), exc
            assert "/etc/passwd is a FIFO, not a regular file" in exc.message, exc
    finally:
        box.delete(cid)


def test_uids_and_gids_of_2_31_and_more_are_refused_never_root(box, client, container):
    """`svc:x:3000000000:...` once ran as uid 0; `runc exec --user 3000000000` refuses."""
    cid = box.run("bigids")
    try:
        wait_ready(client, cid)
        etc = os.path.join(rootfs(box, cid), "etc")
        with open(os.path.join(etc, "passwd"), "a") as f:
            f.write("svc:x:3000000000:3000000000::/:/bin/sh\n"
                    "max:x:4294967295:100::/:/bin/sh\n"
                    "carol:x:1002:1002::/:/bin/sh\n")
        with open(os.path.join(etc, "group"), "a") as f:
            f.write("big:x:3000000000:carol\n")
        for user in ("svc", "max", "3000000000", "4294967295", "-1", "alice:big", "alice:3000000000",
                     "carol"):
            exc = refusal(client, container, cid, user)
            assert exc.code == errors.SPAWN_FAILED and RANGE in exc.message, (user, exc)
        r = client.exec(cid, ["id", "-u"], user="alice", timeout=5)
        assert r["stdout"] == b"1000\n"
    finally:
        box.delete(cid)


def test_a_huge_passwd_is_refused_and_a_large_symlinked_one_read_whole(box, client, container):
    """Over the bound: a clear error, not a file silently cut. Under it, a symlinked
    passwd of 2 MiB whose user is on its last line: found (the old reader stopped at
    1 MiB)."""
    cid = box.run("hugepasswd")
    try:
        wait_ready(client, cid)
        etc = os.path.join(rootfs(box, cid), "etc")
        with open(os.path.join(etc, "passwd"), "rb") as f:
            head = f.read()
        filler = b"".join(b"u%07d:x:%d:%d::/:/bin/sh\n" % (i, 10000 + i, 10000 + i) for i in range(70_000))
        with open(os.path.join(etc, "passwd.real"), "wb") as f:
            f.write(head + filler[: 2 << 20] + b"\nlate:x:4000:4000::/:/bin/sh\n")
        os.unlink(os.path.join(etc, "passwd"))
        os.symlink("passwd.real", os.path.join(etc, "passwd"))
        r = client.exec(cid, ["id", "-u"], user="late", timeout=DEADLINE)
        assert r["stdout"] == b"4000\n", r
        with open(os.path.join(etc, "passwd.real"), "wb") as f:
            f.write(head + filler * 2)  # alice on the first lines; over 4 MiB
            assert f.tell() > MAX_FILE
        exc = refusal(client, container, cid, "alice")
        assert exc.code == errors.SPAWN_FAILED, exc
        assert f"/etc/passwd is larger than {MAX_FILE} bytes" in exc.message, exc
    finally:
        box.delete(cid)
