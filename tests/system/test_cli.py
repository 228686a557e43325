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


def test_exec_streams_in_order_and_passes_the_exit_code(supervisor, container):
    r = cli(supervisor, "exec", "--stream", container, "--", "sh", "-c",
            "echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, b"a\nc\n", b"b\n")


def test_exec_i_streams_more_than_one_request_holds(supervisor, container):
    data = os.urandom(6 << 20)  # past the 4 MiB a one-shot request carries
    r = cli(supervisor, "exec", "-i", container, "--", "cat", stdin=data)
    assert r.returncode == 0 and r.stdout == data
    r = cli(supervisor, "exec", "-i", "--no-stream", container, "--", "cat", stdin=data)
    assert r.returncode == 125 and b"exceeds the 4 MiB limit" in r.stderr


def test_env_file_as_docker_reads_it(supervisor, container, tmp_path):
    path = tmp_path / "env"
    path.write_text("# a comment\n\nA=1\n  B=two words\nFROM_OURS\nUNSET_HERE\nA=3\n")
    env = dict(os.environ, FROM_OURS="ours")
    env.pop("UNSET_HERE", None)
    argv = [sys.executable, "-m", "warmexec.supervisor.cli", "exec", "--endpoint", supervisor.endpoint,
            "--env-file", str(path), "-e", "B=flag", container, "--", "sh", "-c",
            'echo "$A|$B|$FROM_OURS|${UNSET_HERE-unset}"']
    r = subprocess.run(argv, capture_output=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, b"3|flag|ours|unset\n")
    path.write_text("BAD NAME=1\n")
    r = subprocess.run(argv, capture_output=True, env=env, timeout=60)
    assert r.returncode == 125 and b"whitespaces" in r.stderr


def test_detach_inspect_and_kill_from_the_command_line(supervisor, container):
    r = cli(supervisor, "exec", "-d", container, "--", "sleep", "1000")
    assert r.returncode == 0
    exec_id, pid = map(int, r.stdout.split())
    info = json.loads(cli(supervisor, "inspect", str(exec_id)).stdout)
    assert info["running"] is True and info["pid"] == pid and info["argv"] == ["sleep", "1000"]
    assert cli(supervisor, "kill", "-s", "TERM", str(exec_id)).returncode == 0
    from .conftest import wait_for
    info = wait_for(lambda: (lambda i: i if not i["running"] else None)(
        json.loads(cli(supervisor, "inspect", str(exec_id)).stdout)), 10, "the exec to end")
    assert info["exit_code"] == 143
    r = cli(supervisor, "inspect", "999999999")
    assert r.returncode == 125 and b"NO_SUCH_EXEC" in r.stderr

