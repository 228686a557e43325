"""Unit tests for supervisor/status.py on synthetic wait statuses and errnos."""

from __future__ import annotations

import errno
import signal

import pytest

from warmexec.protocol import errors
from warmexec.supervisor.status import decode, spawn_failure

CORE = 0x80


def exited(code: int) -> int:
    return (code & 0xFF) << 8


def killed(sig: int, core: bool = False) -> int:
    return sig | (CORE if core else 0)


@pytest.mark.parametrize("code", [0, 1, 2, 42, 126, 127, 128, 200, 255])
def test_normal_exit(code):
    assert decode(exited(code)) == {"exit_code": code, "signal": None, "core_dumped": False}


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGKILL, signal.SIGTERM,
                                 signal.SIGUSR1, signal.SIGPIPE, 31, 64])
def test_killed_by_signal(sig):
    sig = int(sig)
    d = decode(killed(sig))
    assert d["exit_code"] == 128 + sig
    assert d["signal"] == sig
    assert not d["core_dumped"]


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGABRT, signal.SIGSEGV])
def test_core_dump_flag(sig):
    sig = int(sig)
    d = decode(killed(sig, core=True))
    assert d["exit_code"] == 128 + sig
    assert d["signal"] == sig
    assert d["core_dumped"] is True


def test_sigkill_is_137_and_sigterm_is_143():
    assert decode(killed(signal.SIGKILL))["exit_code"] == 137
    assert decode(killed(signal.SIGTERM))["exit_code"] == 143


def test_decoded_fields_are_plain_types():
    d = decode(killed(signal.SIGSEGV, core=True))
    assert type(d["exit_code"]) is int and type(d["signal"]) is int
    assert isinstance(d["core_dumped"], bool)
    assert type(decode(exited(3))["exit_code"]) is int


def test_stopped_status_is_not_an_exit():
    # 0x7f in the low byte is "stopped" (only reported with WUNTRACED): never a real exit.
    d = decode((signal.SIGSTOP << 8) | 0x7F)
    assert d["signal"] is None and d["core_dumped"] is False
    assert d["exit_code"] == 255


def test_lookup_stage_is_not_found_127():
    code, message, exit_code = spawn_failure(errno.ENOENT, "lookup", "nosuchcmd", None)
    assert (code, exit_code) == (errors.NOT_FOUND, 127)
    assert "nosuchcmd" in message
    # Whatever errno came with it: a lookup failure is "not found".
    assert spawn_failure(0, "lookup", "x", None)[::2] == (errors.NOT_FOUND, 127)
    assert spawn_failure(errno.EACCES, "lookup", "x", None)[::2] == (errors.NOT_FOUND, 127)


@pytest.mark.parametrize("err", [errno.ENOENT, errno.ENOTDIR])
def test_exec_not_found_is_127(err):
    code, message, exit_code = spawn_failure(err, "exec", "/bin/missing", None)
    assert (code, exit_code) == (errors.NOT_FOUND, 127)
    assert "/bin/missing" in message


@pytest.mark.parametrize("err", [errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM])
def test_exec_not_executable_is_permission_126(err):
    code, message, exit_code = spawn_failure(err, "exec", "/etc/passwd", None)
    assert (code, exit_code) == (errors.PERMISSION, 126)
    assert "/etc/passwd" in message


@pytest.mark.parametrize("err", [errno.ENOENT, errno.ENOTDIR, errno.EACCES])
def test_cwd_stage_is_bad_cwd_without_exit_code(err):
    code, message, exit_code = spawn_failure(err, "cwd", "true", "/no/such/dir")
    assert code == errors.BAD_CWD
    assert exit_code is None
    assert "/no/such/dir" in message


@pytest.mark.parametrize("err", [errno.E2BIG, errno.ENOMEM, errno.EAGAIN, errno.ETXTBSY, 0])
def test_other_exec_failures_are_spawn_failed(err):
    code, message, exit_code = spawn_failure(err, "exec", "true", None)
    assert code == errors.SPAWN_FAILED
    assert exit_code is None
    assert isinstance(message, str) and message


def test_all_codes_are_registered_error_codes():
    for args in [(errno.ENOENT, "lookup", "a", None), (errno.ENOENT, "exec", "a", None),
                 (errno.EACCES, "exec", "a", None), (errno.ENOENT, "cwd", "a", "/x"),
                 (errno.ENOMEM, "exec", "a", None)]:
        assert spawn_failure(*args)[0] in errors.ALL


@pytest.mark.parametrize("stage", ["pipe", "stdin"])
def test_no_descriptor_left_is_spawn_failed_naming_the_fd_limit(stage):
    code, message, exit_code = spawn_failure(errno.EMFILE, stage, "sh", None)
    assert (code, exit_code) == (errors.SPAWN_FAILED, None)
    assert "open-file limit" in message and stage in message
