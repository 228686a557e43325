"""Credential profiles: what runc applies to an exec'd process, computed once.

A profile is everything about an exec that depends on the user and the privileged
flag, not on the command: groups, gid, uid, the five capability sets, no_new_privs,
rlimits and umask. A worker takes one profile for its whole life, so each exec it
starts is a plain vfork+exec that inherits all of it.

The order of :func:`apply` is runc's (finalizeNamespace): rlimits while still root,
the bounding set, keep-caps across the uid change, groups/gid/uid, then effective,
permitted and inheritable, then ambient; no_new_privs and the umask last. The seccomp
filter goes last when no_new_privs is set, else first (loading it then needs
CAP_SYS_ADMIN, which the later steps may drop), as runc orders it.
"""

from __future__ import annotations

import errno
import os
import resource

from . import linux, seccomp
from .users import MAX_FILE, ExecUser, InvalidUser, check_ids, file_kind, resolve

#: rlimits a long-lived Python worker cannot itself live under (cumulative CPU time,
#: address space, heap, too few fds for its commands' pipes): a profile that has one is
#: applied per exec in a forked child instead of once in the worker. A worker holds up
#: to three fds per running command: under 1024 the container's limit would cap its
#: concurrent execs below what `runc exec` takes (each its own process).
_DEFERRED = {resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_DATA}
_MIN_WORKER_NOFILE = 1024
_CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def _read(path: str, limit: int = MAX_FILE) -> str:
    """A user database file of the container as text; "" if there is none (docker
    reads a missing file as empty).

    The container's root controls the file, so it is opened without blocking (a FIFO
    or a device in its place must not hang the joiner; no controlling terminal), read
    only if it is a regular file (symlinks are followed: they are normal in images),
    and refused past ``limit`` bytes rather than cut (a cut file loses the entries past
    the cut). Anything else refuses the exec, naming the file: moby fails a lookup on a
    read error too (a directory, an oversized file), and would hang on a FIFO. Plain fd
    I/O: a text file object costs each worker memory (io, codecs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as exc:  # e.g. a socket (ENXIO), a symlink loop
        raise Refused(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise Refused(f"{path} is {kind}, not a regular file")
        data = bytearray()
        while len(data) <= limit:  # st_size is only a hint: the file may grow meanwhile
            chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Refused(f"{path} is larger than {limit} bytes")
    return data.decode("utf-8", "surrogateescape")  # undecodable bytes kept as they are


def exec_user(process: dict, spec: str | None) -> ExecUser:
    """Resolve the exec's user in the current mount namespace (the container's).

    A name in neither file raises UnknownUser; an id out of range, or a user database
    that cannot be read safely, raises Refused."""
    passwd, group = _read("/etc/passwd"), _read("/etc/group")
    try:
        if spec:
            # Docker's rule since CVE-2022-36109 (containerd's since CVE-2023-25173):
            # the primary group leads the supplementary ones, so a process that changes
            # its effective gid (a setgid program) still holds it, and stays subject to
            # denials made by its group's permissions.
            user = resolve(spec, passwd, group)
            user.groups = [user.gid, *user.groups]
            return user
        # No user in the request: the container's own process user, as runc exec does.
        base = process["user"]
        user = resolve(f"{base['uid']}:{base['gid']}", passwd, group)
        user.groups = check_ids(list(base.get("additional_gids") or []), "additional gid")
        return user
    except InvalidUser as exc:
        raise Refused(str(exc)) from None


class Refused(Exception):
    """The container needs confinement warmexec cannot apply: refuse, never run less
    confined than runc exec would."""


def make_profile(process: dict, spec: str | None, privileged: bool) -> dict:
    if process.get("refuse"):
        raise Refused(process["refuse"])
    user = exec_user(process, spec)
    caps = {name: linux.cap_mask(process["caps"].get(name)) for name in _CAP_SETS}
    if privileged:
        every = linux.BOUNDING
        caps.update(bounding=every, effective=every, permitted=every)
    rlimits = [[getattr(resource, name), soft, hard] for name, soft, hard in process["rlimits"]
               if hasattr(resource, name)]
    return {
        "uid": user.uid, "gid": user.gid, "groups": user.groups, "home": user.home,
        "caps": caps, "no_new_privs": bool(process["no_new_privs"]),
        "rlimits": rlimits, "umask": process["umask"], "seccomp": process.get("seccomp"),
    }


def deferred_rlimits(profile: dict) -> list[list[int]]:
    return [r for r in profile["rlimits"]
            if r[0] in _DEFERRED or (r[0] == resource.RLIMIT_NOFILE and r[1] < _MIN_WORKER_NOFILE)]


def apply(profile: dict) -> None:
    """Take on the profile's credentials. Must run as root, single-threaded."""
    deferred = deferred_rlimits(profile)
    nnp, filt = profile["no_new_privs"], profile.get("seccomp")
    if filt and not nnp:  # without no_new_privs, loading needs CAP_SYS_ADMIN: load it first
        seccomp.load(filt)
    for res, soft, hard in profile["rlimits"]:
        if [res, soft, hard] not in deferred:
            set_rlimit(res, soft, hard)
    caps = profile["caps"]
    for cap in range(linux.LAST_CAP + 1):
        if not caps["bounding"] >> cap & 1:
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
    linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    os.setgroups(profile["groups"])
    os.setresgid(profile["gid"], profile["gid"], profile["gid"])
    os.setresuid(profile["uid"], profile["uid"], profile["uid"])
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    linux.capset(caps["effective"], caps["permitted"], caps["inheritable"])
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(linux.LAST_CAP + 1):
        if caps["ambient"] >> cap & 1:
            try:
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, cap)
            except OSError as exc:  # not in permitted & inheritable: the kernel refuses,
                if exc.errno not in (errno.EPERM, errno.EINVAL):  # as it does for runc
                    raise
    if nnp:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    os.umask(profile["umask"])
    if filt and nnp:  # the last step, so it restricts the command and nothing before it
        seccomp.load(filt)


def set_rlimit(res: int, soft: int, hard: int) -> None:
    try:
        resource.setrlimit(res, (_lim(soft), _lim(hard)))
    except ValueError as exc:  # Python's word for EPERM here (raising a hard limit)
        raise PermissionError(errno.EPERM, f"rlimit {res} ({soft}, {hard}): {exc}") from None


def _lim(value: int) -> int:
    # OCI writes "unlimited" as 2**64-1; Python's resource module wants RLIM_INFINITY.
    return resource.RLIM_INFINITY if value < 0 or value >= 2**63 else value
