"""`warmexec exec -t` / `-it` driven through a real terminal the test owns: a shell in
the container, its tty and size, a resize, Ctrl-C, detach keys, exit codes, the
local terminal restored; the pty's owner beside `runc exec -t`'s."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import wait_for, wait_ready

pytestmark = pytest.mark.root


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:  # in the child, after setsid: the pty is its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A pty the test owns, with argv running on its peer as its controlling terminal."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.master, self.peer = os.openpty()
        _set_size(self.master, rows, cols)
        self.before = termios.tcgetattr(self.peer)
        self.proc = subprocess.Popen(argv, stdin=self.peer, stdout=self.peer, stderr=self.peer,
                                     start_new_session=True, preexec_fn=_take_terminal)
        self.seen = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 15) -> re.Match:
        """Wait for pattern in what came since the last match; return the match."""
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end():]
                return found
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {self.seen[-500:]!r}")
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the command is gone
                    raise AssertionError(f"no {pattern!r} in {self.seen[-500:]!r} (ended)") from None

    def ask(self, command: str, timeout: float = 15) -> bytes:
        """Run a shell command; its output (a marker the echo of the line cannot show)."""
        self.send(f"echo B$((6*7))B; {command}; echo E$((6*7))E\r".encode())
        self.expect(rb"B42B\r\n", timeout)
        return self.expect(rb"(?s)(.*?)E42E\r\n", timeout).group(1)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.peer)


def _cli(supervisor, *args: str) -> list[str]:
    return [sys.executable, "-m", "warmexec.supervisor.cli", "exec", "--endpoint", supervisor.endpoint, *args]


@pytest.fixture
def shell(supervisor, container):
    t = Terminal(_cli(supervisor, "-it", container, "--", "sh"), rows=33, cols=111)
    yield t
    t.close()


def test_a_shell_gets_a_terminal_of_its_own_with_our_size(shell, client, container):
    name = shell.ask("tty").strip()
    assert re.fullmatch(rb"/dev/pts/\d+", name), name
    assert shell.ask("stty size").strip() == b"33 111"
    # its session's controlling terminal: /dev/tty opens, and the shell leads the session
    assert shell.ask("echo ok > /dev/tty").strip() == b"ok"
    stat = shell.ask("cat /proc/$$/stat").rsplit(b")", 1)[1].split()
    pid, sid, tty_nr = int(shell.ask("echo $$")), int(stat[3]), int(stat[4])
    assert sid == pid and tty_nr != 0
    # the pty is of the container's own devpts instance, not the host's
    inside = int(shell.ask("stat -c %d /dev/pts/ptmx"))
    assert inside != os.stat("/dev/pts/ptmx").st_dev

def test_a_resize_is_seen_inside(shell):
    assert shell.ask("stty size").strip() == b"33 111"
    _set_size(shell.master, 40, 120)  # the CLI gets SIGWINCH and sends a resize
    wait_for(lambda: shell.ask("stty size").strip() == b"40 120", timeout=10, what="resize seen")


FOREGROUND_SLEEP = """for s in /proc/[0-9]*/stat; do read -r l < $s || continue
case "$l" in *"(sleep) S"*) set -- $l; [ "$5" = "$8" ] && echo fg;; esac; done"""


def test_ctrl_c_stops_the_foreground_command_and_the_shell_lives_on(shell, client, container):
    def sleeping() -> bool:  # sleep runs and leads the terminal's foreground group
        r = client.exec(container, ["sh", "-c", FOREGROUND_SLEEP], timeout=5)
        return r["stdout"] == b"fg\n"

    pid = shell.ask("echo $$").strip()
    shell.send(b"sleep 100\r")
    wait_for(sleeping, timeout=10, what="sleep running")
    started = time.monotonic()
    shell.send(b"\x03")  # a byte: the terminal's line discipline makes it SIGINT
    shell.expect(rb"\^C")
    shell.send(b"echo status-$?\r")  # sleep's: killed by SIGINT
    shell.expect(rb"status-130\r\n")
    assert shell.ask("echo $$").strip() == pid  # the same shell
    assert client.exec(container, ["sh", "-c", FOREGROUND_SLEEP], timeout=5)["stdout"] == b""
    assert time.monotonic() - started < 10


def test_exit_code_passes_through_and_the_local_terminal_is_restored(shell):
    shell.ask("true")
    during = termios.tcgetattr(shell.peer)
    assert during != shell.before  # raw while the exec runs
    assert not during[3] & termios.ECHO and not during[3] & termios.ICANON
    shell.send(b"exit 3\r")
    assert shell.wait() == 3
    assert termios.tcgetattr(shell.peer) == shell.before


def test_output_written_just_before_exit_is_not_lost(supervisor, container):
    t = Terminal(_cli(supervisor, "-t", container, "--", "sh", "-c", "seq 1 20000; exit 7"))
    try:
        t.expect(rb"\r+\n20000\r+\n")  # (-t alone: our terminal is not raw, its ONLCR adds one \r)
        assert t.wait() == 7
        assert t.seen == b""  # nothing after the last line
    finally:
        t.close()


def test_a_signal_to_the_cli_restores_the_terminal(supervisor, container):
    t = Terminal(_cli(supervisor, "-it", container, "--", "sh"))
    try:
        assert t.ask("echo up").strip() == b"up"
        assert termios.tcgetattr(t.peer) != t.before
        t.proc.send_signal(signal.SIGTERM)
        assert t.wait() == 128 + signal.SIGTERM
        assert termios.tcgetattr(t.peer) == t.before
    finally:
        t.close()


def test_detach_keys_leave_the_exec_running(supervisor, container):
    t = Terminal(_cli(supervisor, "-it", "--detach-keys", "ctrl-x,y", container, "--", "sh"))
    try:
        pid = int(t.ask("echo $$"))
        t.send(b"\x18y")
        assert t.wait() == 0
        exec_id = int(t.expect(rb"detached from exec (\d+)").group(1))
        assert termios.tcgetattr(t.peer) == t.before
        with Client(supervisor.endpoint) as c:
            info = c.inspect(exec_id)
            assert info["running"] and info["tty"] and info["container_pid"] == pid
            c.kill(exec_id)
            wait_for(lambda: not c.inspect(exec_id)["running"], timeout=10, what="killed")
    finally:
        t.close()


def test_a_held_back_prefix_of_the_detach_keys_is_sent_on(shell):
    """ctrl-p then not ctrl-q: both bytes reach the shell (here: ^P is a no-op for sh)."""
    shell.send(b"echo \x10x-")
    shell.send(b"y\r")
    shell.expect(rb"x-y\r\n")


@pytest.mark.parametrize("user", ["1000", "alice"])
def test_the_pty_belongs_to_the_exec_user_as_under_runc_exec(box, supervisor, container, user):
    probe = 'stat -c "%u %g %a" $(tty); id -u'
    answers = []
    runc = ["runc", "--root", box.root, "exec", "-t", "--user", "1000:1000", container]
    for argv in (_cli(supervisor, "-t", "-u", user, container, "--", "sh", "-c", probe),
                 [*runc, "sh", "-c", probe]):
        t = Terminal(argv)
        try:
            answers.append(t.expect(rb"(\d+ \d+ \d+)\r+\n1000\r+\n").group(1))
            assert t.wait() == 0
        finally:
            t.close()
    ours, runcs = answers
    assert ours.split()[0] == b"1000" and ours.split()[2] == b"620", ours
    assert ours == runcs


def test_a_container_without_a_real_multiplexer_gets_a_clear_error(box, client):
    """No devpts of its own, and /dev/ptmx a FIFO the container planted (runc would
    make it a symlink to pts/ptmx): the worker opens neither (a FIFO would block
    another reader; only a 5:2 device is taken) and the exec fails, the worker lives."""
    cfg = box.config()
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != "/dev/pts"]
    cid = box.run("no-devpts", cfg)
    try:
        wait_ready(client, cid)
        plant = "rm -f /dev/ptmx && mkfifo /dev/ptmx && ls -l /dev/ptmx"
        r = client.exec(cid, ["sh", "-c", plant], timeout=5)
        assert r["exit_code"] == 0 and r["stdout"].startswith(b"p"), r
        s = client.stream(cid, ["sh"], tty=True, interactive=True)
        with pytest.raises(WarmexecError) as e:
            list(s.events())
        assert e.value.code == errors.SPAWN_FAILED and "no terminal" in e.value.message
        assert client.exec(cid, ["true"], timeout=5)["exit_code"] == 0  # the same worker serves on
    finally:
        box.kill(cid)
        box.delete(cid)


def test_a_process_left_holding_the_terminal_does_not_hold_the_exit(supervisor, container):
    t = Terminal(_cli(supervisor, "-t", container, "--", "sh", "-c", "sleep 100 & echo bg; exit 2"))
    try:
        started = time.monotonic()
        t.expect(rb"bg\r+\n")
        assert t.wait() == 2 and time.monotonic() - started < 10
    finally:
        t.close()


def test_a_command_that_closes_its_terminal_is_not_hung_up_before_it_exits(client, container):
    """Once no process holds the terminal's peer, its master reads EIO; closing the
    master then would hang the terminal up and SIGHUP a command still on its way out
    (a program closing its stdio before it exits was seen ending 129, killed by SIGHUP)."""
    s = client.stream(container, ["sh", "-c", "exec 0<&- 1>&- 2>&-; sleep 0.5; exit 4"], tty=True)
    list(s.events())
    assert (s.result["exit_code"], s.result["signal"]) == (4, None), s.result
