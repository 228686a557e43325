"""Pure parts of worker/creds.py, worker/linux.py and worker/worker.py (no root)."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from warmexec.protocol.caps import CAP_NAMES
from warmexec.worker import creds, linux, worker

CHOWN, KILL, NET_BIND, SYS_ADMIN = 0, 5, 10, 21


def bit(*nums: int) -> int:
    return sum(1 << n for n in nums)


# ----------------------------------------------------------------------- cap_mask

def test_cap_mask_numbers_follow_the_kernel_table():
    assert linux.CAP_NUMBERS["CAP_CHOWN"] == CHOWN
    assert linux.CAP_NUMBERS["CAP_KILL"] == KILL
    assert linux.CAP_NUMBERS["CAP_SYS_ADMIN"] == SYS_ADMIN
    assert len(set(CAP_NAMES)) == len(CAP_NAMES)


def test_cap_mask_empty():
    assert linux.cap_mask(None) == 0
    assert linux.cap_mask([]) == 0


def test_cap_mask_with_prefix():
    assert linux.cap_mask(["CAP_CHOWN", "CAP_KILL"]) == bit(CHOWN, KILL)


def test_cap_mask_without_prefix_and_any_case():
    assert linux.cap_mask(["CHOWN", "kill", "cap_net_bind_service", "Sys_Admin"]) == \
        bit(CHOWN, KILL, NET_BIND, SYS_ADMIN)


def test_cap_mask_unknown_names_skipped():
    assert linux.cap_mask(["CAP_CHOWN", "CAP_NOT_A_THING", "", "BOGUS"]) == bit(CHOWN)


def test_cap_mask_duplicates_are_idempotent():
    assert linux.cap_mask(["CAP_KILL", "KILL", "cap_kill"]) == bit(KILL)


def test_cap_mask_skips_caps_beyond_the_running_kernel(monkeypatch):
    monkeypatch.setattr(linux, "LAST_CAP", KILL)
    assert linux.cap_mask(["CAP_CHOWN", "CAP_KILL", "CAP_SYS_ADMIN"]) == bit(CHOWN, KILL)


def test_cap_mask_all_known_names_within_last_cap():
    mask = linux.cap_mask(list(CAP_NAMES))
    expect = bit(*range(min(linux.LAST_CAP, len(CAP_NAMES) - 1) + 1))
    assert mask == expect


# ----------------------------------------------------------------- deferred rlimits

def _profile(*rlimits):
    return {"rlimits": [list(r) for r in rlimits]}


@pytest.mark.parametrize("res", [resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_DATA])
def test_cpu_as_data_always_deferred(res):
    assert creds.deferred_rlimits(_profile((res, 10, 20))) == [[res, 10, 20]]
    big = 2**64 - 1
    assert creds.deferred_rlimits(_profile((res, big, big))) == [[res, big, big]]


def test_nofile_below_1024_deferred():
    """A worker needs up to three fds per running command: a container limit under
    1024 is applied per command, so that it caps each command, not the worker."""
    r = resource.RLIMIT_NOFILE
    assert creds.deferred_rlimits(_profile((r, 63, 63))) == [[r, 63, 63]]
    assert creds.deferred_rlimits(_profile((r, 64, 64))) == [[r, 64, 64]]
    assert creds.deferred_rlimits(_profile((r, 1023, 4096))) == [[r, 1023, 4096]]
    assert creds.deferred_rlimits(_profile((r, 0, 1024))) == [[r, 0, 1024]]


def test_nofile_at_or_above_1024_not_deferred():
    r = resource.RLIMIT_NOFILE
    assert creds.deferred_rlimits(_profile((r, 1024, 1024))) == []
    assert creds.deferred_rlimits(_profile((r, 1024, 4096))) == []
    assert creds.deferred_rlimits(_profile((r, 2**64 - 1, 2**64 - 1))) == []


@pytest.mark.parametrize("res", [resource.RLIMIT_NPROC, resource.RLIMIT_CORE,
                                 resource.RLIMIT_STACK, resource.RLIMIT_FSIZE,
                                 resource.RLIMIT_MEMLOCK])
def test_other_rlimits_not_deferred(res):
    assert creds.deferred_rlimits(_profile((res, 1, 2))) == []


def test_deferred_keeps_order_and_filters_mixed_profile():
    prof = _profile((resource.RLIMIT_NOFILE, 1024, 1024), (resource.RLIMIT_AS, 1, 2),
                    (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, 3, 4))
    assert creds.deferred_rlimits(prof) == [[resource.RLIMIT_AS, 1, 2], [resource.RLIMIT_CPU, 3, 4]]
    assert creds.deferred_rlimits(_profile()) == []


# ---------------------------------------------------------------------------- _lim

def test_lim_unlimited_values():
    assert creds._lim(2**64 - 1) == resource.RLIM_INFINITY
    assert creds._lim(-1) == resource.RLIM_INFINITY
    assert creds._lim(2**63) == resource.RLIM_INFINITY


@pytest.mark.parametrize("value", [0, 1, 64, 1024, 1 << 40])
def test_lim_finite_values_unchanged(value):
    assert creds._lim(value) == value


# ---------------------------------------------------------------------------- lookup

@pytest.fixture
def path_dirs(tmp_path):
    """d1 has a non-executable 'tool' and a directory 'dir'; d2 an executable 'tool',
    'dir' and 'plain'; d3 an executable 'dir' and a non-executable 'noexec'."""
    d1, d2, d3 = (tmp_path / n for n in ("d1", "d2", "d3"))
    for d in (d1, d2, d3):
        d.mkdir()

    def make(path, mode):
        path.write_text("#!/bin/sh\n")
        os.chmod(path, mode)
        return str(path)

    make(d1 / "tool", 0o644)
    (d1 / "dir").mkdir()
    tool = make(d2 / "tool", 0o755)
    make(d2 / "only-group-x", 0o610)
    (d2 / "dir").mkdir()
    dir_exe = make(d3 / "dir", 0o700)
    make(d3 / "noexec", 0o600)
    return {"d1": str(d1), "d2": str(d2), "d3": str(d3), "tool": tool, "dir_exe": dir_exe}


def test_lookup_name_with_slash_returned_as_is():
    assert worker.lookup("/no/such/file", "/bin") == ("/no/such/file", 0)
    assert worker.lookup("./rel", None) == ("./rel", 0)
    assert worker.lookup("a/b", "") == ("a/b", 0)


def test_lookup_skips_non_executable_files(path_dirs):
    p = f"{path_dirs['d1']}:{path_dirs['d2']}"
    assert worker.lookup("tool", p) == (path_dirs["tool"], 0)


def test_lookup_skips_directories(path_dirs):
    p = ":".join(path_dirs[d] for d in ("d1", "d2", "d3"))
    assert worker.lookup("dir", p) == (path_dirs["dir_exe"], 0)


def test_lookup_any_exec_bit_counts(path_dirs):
    found, err = worker.lookup("only-group-x", path_dirs["d2"])
    assert (found, err) == (os.path.join(path_dirs["d2"], "only-group-x"), 0)


def test_lookup_first_match_wins(path_dirs, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "tool").write_text("")
    os.chmod(first / "tool", 0o700)
    p = f"{first}:{path_dirs['d2']}"
    assert worker.lookup("tool", p) == (str(first / "tool"), 0)


def test_lookup_not_found(path_dirs):
    p = ":".join(path_dirs[d] for d in ("d1", "d2", "d3"))
    assert worker.lookup("missing", p) == (None, errno.ENOENT)
    assert worker.lookup("noexec", p) == (None, errno.ENOENT)
    assert worker.lookup("tool", path_dirs["d1"]) == (None, errno.ENOENT)
    assert worker.lookup("tool", "/no/such/dir") == (None, errno.ENOENT)


def test_lookup_missing_path_entries_are_skipped(path_dirs):
    p = f"/no/such/dir:{path_dirs['d1']}/tool:{path_dirs['d2']}"
    assert worker.lookup("tool", p) == (path_dirs["tool"], 0)


@pytest.mark.parametrize("path_var", [None, ""])
def test_lookup_empty_path_searches_nothing(path_dirs, monkeypatch, path_var):
    monkeypatch.chdir(path_dirs["d2"])
    assert worker.lookup("tool", path_var) == (None, errno.ENOENT)
