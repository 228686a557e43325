"""Unit tests for worker/users.py (docker's user-spec resolution on file text, as moby's
user package does it) and for creds._read / creds.exec_user (the container's files
read without blocking, bounded, and ids out of range refused)."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from warmexec.worker import creds
from warmexec.worker.users import (
    GROUP_LINE_MAX,
    MAX_FILE,
    PASSWD_LINE_MAX,
    ExecUser,
    InvalidUser,
    UnknownUser,
    resolve,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/bash
bob:x:1001:1001:Bob::/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""

GROUP = """\
root:x:0:
daemon:x:1:
wheel:x:10:alice,root
audio:x:29:bob,alice
alice:x:1000:
bob:x:1001:
staff:x:50:carol
nogroup:x:65534:
"""


def test_name_lookup_gets_uid_gid_home_and_supplementary_groups():
    u = resolve("alice", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")


def test_root_by_name():
    u = resolve("root", PASSWD, GROUP)
    assert (u.uid, u.gid, u.home) == (0, 0, "/root")
    assert u.groups == [10]


def test_empty_home_field_becomes_slash():
    u = resolve("bob", PASSWD, GROUP)
    assert (u.uid, u.gid, u.home, u.groups) == (1001, 1001, "/", [29])


def test_user_in_no_group_has_no_supplementary_groups():
    u = resolve("daemon", PASSWD, GROUP)
    assert u == ExecUser(1, 1, [], "/usr/sbin")


def test_numeric_uid_in_passwd_gets_passwd_gid_home_and_groups():
    u = resolve("1000", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")


def test_numeric_uid_is_always_a_uid_never_a_name():
    # A user literally named "1000" must not shadow uid 1000 (libcontainer rule).
    passwd = "1000:x:5:5::/five:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
    u = resolve("1000", passwd, "")
    assert (u.uid, u.gid, u.home) == (1000, 1000, "/home/alice")


def test_numeric_uid_absent_from_passwd():
    u = resolve("4242", PASSWD, GROUP)
    assert u == ExecUser(uid=4242, gid=0, groups=[], home="/")


def test_numeric_uid_with_empty_files():
    assert resolve("0", "", "") == ExecUser(0, 0, [], "/")
    assert resolve("123", "", "") == ExecUser(123, 0, [], "/")


def test_user_colon_group_names_explicit_group_drops_supplementary():
    u = resolve("alice:audio", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=29, groups=[], home="/home/alice")


def test_user_colon_group_numbers():
    u = resolve("1000:10", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=10, groups=[], home="/home/alice")


def test_numbers_absent_from_both_files_taken_as_is():
    u = resolve("4242:4343", PASSWD, GROUP)
    assert u == ExecUser(uid=4242, gid=4343, groups=[], home="/")


def test_name_user_numeric_group_absent_from_group_file():
    u = resolve("alice:777", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=777, groups=[], home="/home/alice")


def test_numeric_user_with_group_name():
    u = resolve("4242:wheel", PASSWD, GROUP)
    assert u == ExecUser(uid=4242, gid=10, groups=[], home="/")


def test_unknown_user_name_raises():
    with pytest.raises(UnknownUser):
        resolve("mallory", PASSWD, GROUP)


def test_unknown_user_name_with_empty_files_raises():
    with pytest.raises(UnknownUser):
        resolve("alice", "", "")


def test_unknown_group_name_raises():
    with pytest.raises(UnknownUser):
        resolve("alice:nosuchgroup", PASSWD, GROUP)
    with pytest.raises(UnknownUser):
        resolve("4242:nosuchgroup", PASSWD, GROUP)


def test_numeric_spec_out_of_range_is_refused_not_a_name():
    # moby's parseNumeric: a number past 2147483647 (or past int64, or negative) is
    # ErrRange, as `runc exec --user 3000000000` says; it is never looked up as a name.
    for spec in (str(2**31), "3000000000", "4294967295", "-1", "99999999999999999999",
                 "alice:2147483648", "1000:-5", "alice:99999999999999999999"):
        with pytest.raises(InvalidUser, match="must be in range 0-2147483647"):
            resolve(spec, PASSWD, GROUP)
    assert resolve(str(2**31 - 1), "", "").uid == 2**31 - 1
    assert resolve(f"0:{2**31 - 1}", "", "").gid == 2**31 - 1


def test_non_ascii_digits_are_names_not_uids():
    # str.isdigit() accepts e.g. superscripts and Arabic-Indic digits; a client must not
    # be able to crash the worker (ValueError) or alias uid 1 with them.
    for spec in ("\u00b2", "\u0661", "1\u00b2"):
        with pytest.raises(UnknownUser):
            resolve(spec, PASSWD, GROUP)


def test_blank_lines_skipped_and_group_comments_ignored():
    passwd = """

alice:x:1000:1000:Alice:/home/alice:/bin/bash
"""
    group = """
# comment
   #wheel:x:20:alice
wheel:x
wheel:x:10:alice

audio:x:29:alice
"""
    u = resolve("alice", passwd, group)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")


def test_short_lines_count_with_their_missing_fields_empty_as_in_moby():
    # moby parses whatever fields a line has: missing ids are 0, a missing home empty.
    assert resolve("alice", "alice:x:1000:1000\n", "") == ExecUser(1000, 1000, [], "/")
    assert resolve("alice", "alice:x:1000\n", "") == ExecUser(1000, 0, [], "/")
    assert resolve("alice", "alice\n", "") == ExecUser(0, 0, [], "/")
    # the first matching line wins, short or not
    assert resolve("alice", "alice:x:7\n" + PASSWD, "").uid == 7


def test_passwd_has_no_comment_lines_as_in_moby():
    # Only moby's group reader skips '#' lines; in passwd "#alice" is a user of that name.
    passwd = "#alice:x:1000:1000::/commented:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
    assert resolve("1000", passwd, "").home == "/commented"
    assert resolve("#alice", passwd, "").home == "/commented"
    assert resolve("alice", passwd, "").home == "/home/alice"


def test_only_newline_ends_a_line_and_go_white_space_is_trimmed():
    # str.splitlines() would also split at \x85, \x1c or \u2028 (inside a GECOS field,
    # say), str.strip() would trim \x1c: Go's scanner and TrimSpace do neither.
    passwd = ("alice:x:1000:1000:A\x85B\u2028C:/home/alice:/bin/sh\n"
              "\x1cbob:x:1001:1001::/home/bob:/bin/sh\n"
              "\xa0\u3000carol:x:1002:1002::/home/carol:/bin/sh\u2029\r\n")
    assert resolve("alice", passwd, "").home == "/home/alice"
    with pytest.raises(UnknownUser):
        resolve("bob", passwd, "")
    assert resolve("\x1cbob", passwd, "").uid == 1001
    assert resolve("carol", passwd, "") == ExecUser(1002, 1002, [], "/home/carol")


def test_passwd_line_over_64k_fails_the_lookup_wherever_it_is():
    # moby's passwd reader is a bufio.Scanner with its 64 KiB token limit: a longer
    # line fails the whole lookup, even one after the matching entry.
    long = "x" * (PASSWD_LINE_MAX + 1)
    for passwd in (PASSWD + long + "\n", long + "\n" + PASSWD, PASSWD + long):
        with pytest.raises(InvalidUser, match="line of /etc/passwd is longer than 65535 bytes"):
            resolve("alice", passwd, GROUP)
    # the limit is in bytes: 30,000 two-byte characters are over it
    with pytest.raises(InvalidUser):
        resolve("alice", PASSWD + "\u00e9" * 33_000 + "\n", GROUP)
    assert resolve("alice", PASSWD + "x" * PASSWD_LINE_MAX + "\n", GROUP).uid == 1000


def test_group_line_over_1m_fails_only_a_lookup_that_reads_the_group_file():
    group = GROUP + "big:x:99:" + "m," * (GROUP_LINE_MAX // 2) + "\n"
    with pytest.raises(InvalidUser, match="line of /etc/group is longer than 1048575 bytes"):
        resolve("alice", PASSWD, group)
    with pytest.raises(InvalidUser):
        resolve("4242:10", PASSWD, group)
    # a user with no passwd entry and no group part never reads /etc/group (moby)
    assert resolve("4242", PASSWD, group) == ExecUser(4242, 0, [], "/")
    ok = GROUP + "big:x:99:" + "m" * (GROUP_LINE_MAX - 9) + "\n"
    assert resolve("alice", PASSWD, ok).groups == [10, 29]


def test_first_passwd_match_wins():
    passwd = ("alice:x:1000:1000::/first:/bin/sh\n"
              "alice:x:2000:2000::/second:/bin/sh\n"
              "other:x:1000:3000::/third:/bin/sh\n")
    assert resolve("alice", passwd, "").home == "/first"
    u = resolve("1000", passwd, "")
    assert (u.uid, u.gid, u.home) == (1000, 1000, "/first")


def test_first_group_match_wins():
    group = "dup:x:10:\ndup:x:20:\n"
    assert resolve("alice:dup", PASSWD, group).gid == 10


def test_supplementary_groups_match_names_exactly():
    group = "g1:x:10:alicex,xalice\ng2:x:20:bob,alice\ng3:x:30:\n"
    assert resolve("alice", PASSWD, group).groups == [20]


def test_crlf_and_surrounding_whitespace_tolerated():
    passwd = "  alice:x:1000:1000::/home/alice:/bin/sh  \r\n"
    group = "wheel:x:10:alice\r\n"
    u = resolve("alice", passwd, group)
    assert (u.uid, u.home, u.groups) == (1000, "/home/alice", [10])


def test_non_numeric_uid_field_reads_as_zero_like_libcontainer():
    passwd = "alice:x:abc:1000::/home/alice:/bin/sh\n"
    u = resolve("alice", passwd, "")
    assert (u.uid, u.gid) == (0, 1000)
    for garbage in ("", " 5", "5 ", "5_0", "\u0665", "0x10", "+", "1e3"):
        assert resolve("alice", f"alice:x:{garbage}:1::/:/bin/sh\n", "").uid == 0, garbage


def test_trailing_colon_means_no_explicit_group():
    u = resolve("alice:", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")


# ------------------------------------------------------------------ ids as Go reads them

def test_numeric_spec_takes_a_sign_and_leading_zeros_as_go_does():
    assert resolve("+1000", PASSWD, GROUP) == ExecUser(1000, 1000, [10, 29], "/home/alice")
    assert resolve("01000:+10", PASSWD, GROUP) == ExecUser(1000, 10, [], "/home/alice")
    with pytest.raises(UnknownUser):  # not a number for Go: a name, and nobody has it
        resolve(" 1000", PASSWD, GROUP)
    # an id field with a sign still matches the number
    assert resolve("1000", "alice:x:+1000:01000::/h:/bin/sh\n", "") == ExecUser(1000, 1000, [], "/h")


def test_ids_out_of_range_in_passwd_are_refused_never_root():
    # svc:x:3000000000 once ran as uid 0 (an out-of-range field read as 0); 4294967295
    # is -1 for setresuid: "leave unchanged", i.e. still root.
    for uid, gid in (("3000000000", "100"), ("4294967295", "100"), ("-1", "100"),
                     ("99999999999999999999", "100"), ("100", "3000000000"), ("100", "-2")):
        passwd = PASSWD + f"svc:x:{uid}:{gid}::/home/svc:/bin/sh\n"
        with pytest.raises(InvalidUser, match="svc: .*must be in range 0-2147483647"):
            resolve("svc", passwd, GROUP)
        # only the entry that is used counts: others are untouched by it
        assert resolve("alice", passwd, GROUP).uid == 1000
    passwd = PASSWD + "svc:x:3000000000:100::/:/bin/sh\n"
    with pytest.raises(InvalidUser):
        resolve("svc:10", passwd, GROUP)  # an explicit group does not save the uid


def test_ids_out_of_range_in_group_are_refused():
    group = GROUP + "big:x:3000000000:carol\nneg:x:-7:\n"
    passwd = PASSWD + "carol:x:1002:1002::/:/bin/sh\n"
    for spec in ("alice:big", "1000:neg", "carol"):  # explicit group, or a supplementary one
        with pytest.raises(InvalidUser, match="in /etc/group: gid .*must be in range"):
            resolve(spec, passwd, group)
    assert resolve("alice", passwd, group).groups == [10, 29]


def test_empty_user_part_is_uid_0_looked_up_in_passwd():
    # moby: no user means the default uid (0), matched against passwd like any number.
    assert resolve(":10", PASSWD, GROUP) == ExecUser(0, 10, [], "/root")
    assert resolve(":", PASSWD, GROUP) == ExecUser(0, 0, [10], "/root")
    assert resolve(":wheel", "", GROUP) == ExecUser(0, 10, [], "/")


def test_an_entry_with_an_empty_name_gets_no_supplementary_groups():
    passwd = ":x:1500:1500::/nameless:/bin/sh\n"
    assert resolve("1500", passwd, "g:x:5:a,,b\n") == ExecUser(1500, 1500, [], "/nameless")


# ------------------------------------------------------- the container's files, read safely

class Hung(Exception):  # not an OSError, which a reader may catch
    pass


@pytest.fixture
def deadline():
    """A blocking open or read (the bug) fails the test instead of hanging it."""
    def expired(*_):
        raise Hung("blocked reading a container file")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_read_refuses_a_fifo_without_blocking(tmp_path, deadline):
    path = str(tmp_path / "passwd")
    os.mkfifo(path)
    with pytest.raises(creds.Refused, match=f"^{path} is a FIFO, not a regular file$"):
        creds._read(path)


@pytest.mark.parametrize("target, kind", [("/dev/null", "a character device"),
                                          ("/dev/zero", "a character device"),
                                          (".", "a directory")])
def test_read_refuses_devices_and_directories_behind_a_symlink(tmp_path, deadline, target, kind):
    path = str(tmp_path / "passwd")
    os.symlink(target, path)
    with pytest.raises(creds.Refused, match=f"^{path} is {kind}, not a regular file$"):
        creds._read(path)


def test_read_refuses_a_socket_naming_the_file(tmp_path, deadline):
    path = str(tmp_path / "group")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        with pytest.raises(creds.Refused, match=f"cannot open {path}: No such device or address"):
            creds._read(path)


def test_read_takes_the_whole_file_up_to_the_bound_and_refuses_past_it(tmp_path):
    # Today's reader cut every file at 1 MiB, silently losing the users past the cut.
    path = tmp_path / "passwd"
    tail = b"late:x:4000:4000::/home/late:/bin/sh\n"
    filler = MAX_FILE - len(tail)
    path.write_bytes((b"#" * 63 + b"\n") * (filler // 64) + b"\n" * (filler % 64) + tail)
    link = tmp_path / "link"
    os.symlink(path, link)  # symlinks are normal in images: followed
    text = creds._read(str(link))
    assert len(text) == MAX_FILE
    assert resolve("late", text, "").uid == 4000
    with open(path, "ab") as f:
        f.write(b"\n")
    with pytest.raises(creds.Refused, match=f"{path} is larger than {MAX_FILE} bytes"):
        creds._read(str(path))


def test_read_missing_is_empty_and_bytes_are_kept_exactly(tmp_path):
    assert creds._read(str(tmp_path / "none")) == ""
    os.symlink("nowhere", tmp_path / "dangling")
    assert creds._read(str(tmp_path / "dangling")) == ""
    (tmp_path / "file").write_bytes(b"")
    assert creds._read(str(tmp_path / "file" / "passwd")) == ""  # ENOTDIR: no such file
    # undecodable bytes survive to the command's HOME (os.fsencode gives them back), and a
    # name with them matches only itself, as Go compares bytes
    (tmp_path / "passwd").write_bytes(b"\xffu:x:7:7::/home/\xe9t\xe9:/bin/sh\n")
    text = creds._read(str(tmp_path / "passwd"))
    with pytest.raises(UnknownUser):
        resolve("\ufffdu", text, "")
    u = resolve("7", text, "")
    assert os.fsencode(u.home) == b"/home/\xe9t\xe9"


def test_exec_user_refuses_ids_out_of_range_and_unreadable_files(monkeypatch):
    files = {"/etc/passwd": PASSWD + "svc:x:3000000000:1::/:/bin/sh\n", "/etc/group": GROUP}
    monkeypatch.setattr(creds, "_read", lambda path: files[path])
    process = {"user": {"uid": 0, "gid": 0, "additional_gids": [10]}}
    assert creds.exec_user(process, None) == ExecUser(0, 0, [10], "/root")
    assert creds.exec_user(process, "alice").groups == [1000, 10, 29]  # docker's: primary first
    assert creds.exec_user(process, "alice:audio").groups == [29]
    with pytest.raises(creds.Refused, match="must be in range 0-2147483647"):
        creds.exec_user(process, "svc")
    with pytest.raises(creds.Refused, match="must be in range"):
        creds.exec_user(process, "3000000000")
    for user in ({"uid": 3000000000, "gid": 0}, {"uid": 0, "gid": 2**32 - 1},
                 {"uid": 0, "gid": 0, "additional_gids": [10, 3000000000]}):
        with pytest.raises(creds.Refused, match="must be in range"):
            creds.exec_user({"user": user}, None)
    with pytest.raises(UnknownUser):
        creds.exec_user(process, "mallory")
