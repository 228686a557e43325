"""Resolve a user spec against a container's own /etc/passwd and /etc/group.

Docker's rules (libcontainer's user package), so that ``-u`` means the same here:

* ``USER`` (name or number) found in passwd: its uid, primary gid and home, plus
  every group in /etc/group that lists the user's name (supplementary groups).
* ``USER:GROUP``: the group (name or number) replaces the primary gid and no
  supplementary groups are looked up.
* A number with no passwd entry is taken as is, with gid 0 and home ``/``.
* A name that is in neither file is an error.

Pure functions on file text, so they are unit-tested without a container.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ID = 2**31 - 1


class UnknownUser(Exception):
    pass


@dataclass
class ExecUser:
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    home: str = "/"


def _parse(text: str, width: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= width:
            rows.append(parts)
    return rows


def _number(s: str) -> int | None:
    """A user-supplied id: ASCII digits in range, else None (then it is a name)."""
    if s.isascii() and s.isdigit():
        n = int(s)
        return n if n <= MAX_ID else None
    return None


def _field(s: str) -> int:
    """An id field of /etc/passwd or /etc/group; garbage reads as 0, as libcontainer's."""
    return _number(s) or 0


def resolve(spec: str, passwd: str, group: str) -> ExecUser:
    user_part, _, group_part = spec.partition(":")  # "alice:" is plain "alice"
    uid_arg = _number(user_part)
    entry = next((row for row in _parse(passwd, 7)
                  if (row[0] == user_part if uid_arg is None else _field(row[2]) == uid_arg)), None)
    if entry is not None:
        user, name = ExecUser(_field(entry[2]), _field(entry[3]), [], entry[5] or "/"), entry[0]
    elif uid_arg is not None:
        user, name = ExecUser(uid_arg, 0), None
    elif user_part:
        raise UnknownUser(f"unable to find user {user_part}: no matching entries in passwd file")
    else:
        user, name = ExecUser(0, 0), None

    groups = _parse(group, 4)
    if group_part:
        gid_arg = _number(group_part)
        match = next((g for g in groups
                      if (g[0] == group_part if gid_arg is None else _field(g[2]) == gid_arg)), None)
        if match is not None:
            user.gid = _field(match[2])
        elif gid_arg is not None:
            user.gid = gid_arg
        else:
            raise UnknownUser(f"unable to find group {group_part}: no matching entries in group file")
    elif name is not None:
        user.groups = [_field(g[2]) for g in groups if name in g[3].split(",")]
    return user
