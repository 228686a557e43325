"""The `warmexec` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def cli(supervisor, *args, stdin=b"", env_endpoint=False):
    env = dict(os.environ)
    argv = [sys.executable, "-m", "warmexec.supervisor.cli", *args]
    if env_endpoint:
        env["WARMEXEC_ENDPOINT"] = supervisor.endpoint
    else:
        argv[4:4] = ["--endpoint", supervisor.endpoint]
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=60)


def test_exec_passes_output_and_exit_code(supervisor, container):
    r = cli(supervisor, "exec", "-e", "GREETING=hi", "-w", "/tmp", container, "--",
            "sh", "-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 7')
    assert (r.returncode, r.stdout, r.stderr) == (7, b"hi from /tmp\n", b"oops\n")


def test_exec_user_stdin_and_endpoint_from_env(supervisor, container):
    r = cli(supervisor, "exec", "-i", "-u", "alice", container, "--", "sh", "-c", "id -un; cat",
            stdin=b"piped\n", env_endpoint=True)
    assert (r.returncode, r.stdout) == (0, b"alice\npiped\n")


def test_exec_timeout_and_signal_exit_codes(supervisor, container):
    r = cli(supervisor, "exec", "--timeout", "0.3", container, "--", "sleep", "30")
    assert r.returncode == 137 and b"timed out" in r.stderr
    assert cli(supervisor, "exec", container, "--", "no-such-cmd").returncode == 127


def test_own_errors_exit_125(supervisor):
    r = cli(supervisor, "exec", "nope", "--", "true")
    assert r.returncode == 125
    assert b"NO_SUCH_CONTAINER: No active container exists with ID nope" in r.stderr


def test_ls_and_ping(supervisor, container):
    rows = json.loads(cli(supervisor, "ls", "--json").stdout)
    assert any(row["id"] == container and row["state"] == "READY" for row in rows)
    table = cli(supervisor, "ls").stdout.decode()
    assert container in table and "READY" in table
    assert cli(supervisor, "ping").returncode == 0


def test_unreachable_supervisor_is_an_error_not_a_hang(tmp_path):
    env = dict(os.environ, WARMEXEC_ENDPOINT=f"ipc://{tmp_path}/nobody.sock")
    r = subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", "ping"],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 125 and (b"UNREACHABLE" in r.stderr or b"TIMEOUT" in r.stderr)
