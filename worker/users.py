"""Resolve a user spec against a container's own /etc/passwd and /etc/group.

Docker's rules (moby's ``user`` package, which runc's libcontainer/user was), so that
``-u`` means the same here:

* ``USER`` (name or number) found in passwd: its uid, primary gid and home, plus
  every group in /etc/group that lists the user's name (supplementary groups).
  A number is always a uid, never a name; an empty USER (``:GROUP``) means uid 0.
* ``USER:GROUP``: the group (name or number) replaces the primary gid and no
  supplementary groups are looked up.
* A number with no passwd entry is taken as is, with gid 0 and home ``/``.
* A name that is in neither file is an error (:class:`UnknownUser`).

Lines are read as moby reads them: split on ``\\n``, trimmed of white space, blank ones
skipped; in /etc/group only, ``#`` starts a comment. A line with fewer fields than the
format has still counts, its missing fields empty (ids 0). Numbers are Go's
``strconv.Atoi``: an optional sign and ASCII digits; an id field that is not one reads
as 0, a number past int64 as its clamped bound. A passwd line over 64 KiB or a group
line over 1 MiB fails the whole lookup, as moby's line scanner does.

Every id that would be used must lie in 0-2147483647, else :class:`InvalidUser`
(the exec is refused): moby checks the spec's numbers and runc refuses
``--user 3000000000``; warmexec also checks the ids it takes from the files, which
moby does not, because it sets them with setresuid/setresgid, where 4294967295 is -1,
"leave unchanged": a passwd entry could otherwise keep the exec root.

Pure functions on file text, so they are unit-tested without a container.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

MAX_ID = 2**31 - 1
RANGE = f"uids and gids must be in range 0-{MAX_ID}"
PASSWD_LINE_MAX = 64 * 1024 - 1  # bufio.Scanner's default token limit (moby's passwd reader)
GROUP_LINE_MAX = 1024 * 1024 - 1  # moby's group reader raises its scanner's limit to 1 MiB
#: Bound on the size of /etc/passwd and /etc/group. moby reads up to 10 MiB; 4 MiB is
#: still some 50,000 entries, far beyond any image's user database, and keeps what a
#: hostile file costs small: the joiner that reads it is charged to the container's
#: memory cgroup (a file, its text and its lines at once) and must be ready within its
#: start-up deadline (parsing 4 MiB takes about a tenth of a second).
MAX_FILE = 4 << 20

_INT64 = 2**63
#: What Go's bytes.TrimSpace trims: Unicode White_Space (Python's str.strip() also
#: trims \\x1c-\\x1f, which Go does not).
_SPACE = ("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
          "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


class UnknownUser(Exception):
    """A user or group name in neither file (NO_SUCH_USER)."""


class InvalidUser(Exception):
    """Ids or files that runc would refuse, or that warmexec cannot take safely: the
    exec is refused (creds turns this into Refused)."""


@dataclass
class ExecUser:
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    home: str = "/"


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what the file is, for an error message."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def atoi(s: str) -> int | None:
    """Go's strconv.Atoi (64-bit): None for a syntax error; a number past int64 is its
    clamped bound (Go's value with ErrRange). Python's int() alone would also take
    spaces, underscores and non-ASCII digits."""
    digits = s[1:] if s[:1] in ("+", "-") else s
    if not (digits.isascii() and digits.isdigit()):
        return None
    return max(-_INT64, min(int(s), _INT64 - 1))


def _id(fields: list[str], i: int) -> int:
    """An id field; missing or not a number reads as 0, as in moby."""
    n = atoi(fields[i]) if len(fields) > i else None
    return 0 if n is None else n


def _checked(n: int, what: str) -> int:
    if not 0 <= n <= MAX_ID:
        raise InvalidUser(f"{what} {n}: {RANGE}")
    return n


def check_ids(ids: list[int], what: str) -> list[int]:
    return [_checked(n, what) for n in ids]


def _arg(s: str, what: str) -> int | None:
    """A user or group part of the spec: its number, or None when it is a name."""
    n = atoi(s)
    if n is not None:
        _checked(n, what)
    return n


def _rows(text: str, line_max: int, path: str, comments: bool, context: str):
    """The fields of each line of a file, lazily (a large file is never held as a list)."""
    start, end = 0, len(text)
    while start < end:
        stop = text.find("\n", start)
        if stop < 0:
            stop = end
        line = text[start:stop]
        start = stop + 1
        if len(line) > line_max // 4 and len(line.encode("utf-8", "surrogateescape")) > line_max:
            raise InvalidUser(f"{context}: a line of {path} is longer than {line_max} bytes")
        line = line.strip(_SPACE)
        if line and not (comments and line[0] == "#"):
            yield line.split(":")


def resolve(spec: str, passwd: str, group: str) -> ExecUser:
    user_part, _, group_part = spec.partition(":")  # "alice:" is plain "alice"
    uid_arg = _arg(user_part, f"user {spec}: uid") if user_part else 0
    gid_arg = _arg(group_part, f"user {spec}: gid") if group_part else None
    by_name = uid_arg is None
    context = f"unable to find user {user_part or 0}"
    entry = None
    for row in _rows(passwd, PASSWD_LINE_MAX, "/etc/passwd", False, context):
        if entry is None and (row[0] == user_part if by_name else _id(row, 2) == uid_arg):
            entry = row  # first match wins; the rest is still read, as moby reads it
    if entry is not None:
        name = entry[0]
        user = ExecUser(_checked(_id(entry, 2), f"user {spec}: uid in /etc/passwd"),
                        _checked(_id(entry, 3), f"user {spec}: gid in /etc/passwd"),
                        [], (entry[5] if len(entry) > 5 else "") or "/")
    elif by_name:
        raise UnknownUser(f"unable to find user {user_part}: no matching entries in passwd file")
    else:
        name, user = "", ExecUser(uid_arg, 0)

    if not group_part and not name:
        return user
    context = f"unable to find groups for spec {name or spec}"
    match, sgids = None, []
    for row in _rows(group, GROUP_LINE_MAX, "/etc/group", True, context):
        if group_part:
            if match is None and (row[0] == group_part if gid_arg is None else _id(row, 2) == gid_arg):
                match = row
        elif len(row) > 3 and name in row[3].split(","):
            sgids.append(_checked(_id(row, 2), f"user {spec}: group {row[0]!r} in /etc/group: gid"))
    if match is not None:
        user.gid = _checked(_id(match, 2), f"user {spec}: group {group_part} in /etc/group: gid")
    elif gid_arg is not None:
        user.gid = gid_arg
    elif group_part:
        raise UnknownUser(f"unable to find group {group_part}: no matching entries in group file")
    user.groups = sgids
    return user
