"""Unit tests for worker/users.py: docker/libcontainer user-spec resolution on file text."""

from __future__ import annotations

import pytest

from warmexec.worker.users import ExecUser, UnknownUser, resolve

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


def test_uid_beyond_max_id_is_not_a_number():
    # Out of range numbers are not uids; as a name they are unknown.
    with pytest.raises(UnknownUser):
        resolve(str(2**31), PASSWD, GROUP)
    assert resolve(str(2**31 - 1), "", "").uid == 2**31 - 1


def test_non_ascii_digits_are_names_not_uids():
    # str.isdigit() accepts e.g. superscripts and Arabic-Indic digits; a client must not
    # be able to crash the worker (ValueError) or alias uid 1 with them.
    for spec in ("\u00b2", "\u0661", "1\u00b2"):
        with pytest.raises(UnknownUser):
            resolve(spec, PASSWD, GROUP)


def test_comments_blank_and_malformed_lines_are_ignored():
    passwd = """
# a comment
   # an indented comment

alice:x:1000
broken
alice:x:1000:1000:Alice:/home/alice:/bin/bash
"""
    group = """
# comment
wheel:x
wheel:x:10:alice

audio:x:29:alice
"""
    u = resolve("alice", passwd, group)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")


def test_short_passwd_line_with_the_name_does_not_match():
    with pytest.raises(UnknownUser):
        resolve("alice", "alice:x:1000:1000\n", "")


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


def test_trailing_colon_means_no_explicit_group():
    u = resolve("alice:", PASSWD, GROUP)
    assert u == ExecUser(uid=1000, gid=1000, groups=[10, 29], home="/home/alice")
