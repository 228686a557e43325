"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

setns (os.setns is 3.12+), prctl, capget/capset and keyctl. Each raises OSError with
the real errno, so callers can report the kernel's own reason.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from ..protocol.caps import CAP_NAMES

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Every libc function a worker calls, looked up here, at import in the zygote: a
# lookup on first use (CDLL.__getattr__) would build it in each worker instead.
_setns, _prctl, _capset, _syscall = _libc.setns, _libc.prctl, _libc.capset, _libc.syscall

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: /proc/PID/ns/<name> -> clone flag
NAMESPACES = {
    "user": CLONE_NEWUSER,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "armv7l": 311, "ppc64le": 311, "s390x": 280}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "armv7l": 383, "ppc64le": 358, "s390x": 348}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, SECCOMP_SET_MODE_FILTER = 22, 2, 1
KEYCTL_JOIN_SESSION_KEYRING = 1

CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                         ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAP_NAMES) - 1


PR_CAPBSET_READ = 23


def _read_bounding() -> int:
    mask = 0
    for cap in range(LAST_CAP + 1):
        if _prctl(PR_CAPBSET_READ, ctypes.c_ulong(cap), 0, 0, 0) == 1:
            mask |= 1 << cap
    return mask


#: Highest capability the running kernel knows, read at import: on the host, before
#: any setns, since a container's /proc may be masked or missing.
LAST_CAP = _read_last_cap()
#: Our own bounding set: "privileged" is every capability in it, since no process
#: can hold a capability its creator's bounding set lacks.
BOUNDING = _read_bounding()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapData2 = _CapData * 2  # a ctypes array type: made once, here
_CAP_V3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the three capability sets of the calling thread from 64-bit masks."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = _CapData2()
    for i, shift in enumerate((0, 32)):
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_capset(ctypes.byref(hdr), data))


def cap_mask(names: list[str] | None) -> int:
    """Bit mask of capability names; names the kernel or this table lacks are skipped,
    as runc does for capabilities unknown to the running kernel."""
    mask = 0
    for name in names or ():
        num = CAP_NUMBERS.get(name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper())
        if num is not None and num <= LAST_CAP:
            mask |= 1 << num
    return mask


_KEYCTL_NR = _SYS_KEYCTL.get(platform.machine())
_SECCOMP_NR = _SYS_SECCOMP.get(platform.machine())


class _Fprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(bpf: bytes, flags: int) -> None:
    """Install a classic-BPF seccomp program (sock_filter array) on the calling thread:
    seccomp(2) with flags, or prctl(2) where the syscall number is unknown and no flag
    is needed."""
    code = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _Fprog(len(bpf) // 8, ctypes.cast(code, ctypes.c_void_p))
    if _SECCOMP_NR is not None:
        _check(_syscall(ctypes.c_long(_SECCOMP_NR), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                        ctypes.c_long(flags), ctypes.byref(prog)))
    elif flags:
        raise OSError(errno.ENOSYS, f"seccomp(2) flags on {platform.machine()}")
    else:
        _check(_prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0))



def join_session_keyring(name: str) -> None:
    """Join (or create) the named session keyring, so an exec does not share the
    supervisor's session keyring. Silently skipped where keyctl is unavailable."""
    nr = _KEYCTL_NR
    if nr is None:
        return
    ret = _syscall(ctypes.c_long(nr), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
                   ctypes.c_char_p(name.encode()))
    if ret < 0:
        err = ctypes.get_errno()
        if err not in (38, 1):  # ENOSYS, EPERM (keyrings disabled or restricted)
            raise OSError(err, os.strerror(err))


_SYS_WAITID = {"x86_64": 247, "aarch64": 95, "armv7l": 280, "ppc64le": 272, "s390x": 281}
_WAITID_NR = _SYS_WAITID.get(platform.machine())
P_PIDFD, WEXITED, WNOWAIT, WNOHANG = 3, 4, 0x01000000, 1
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


class _SigInfo(ctypes.Structure):  # the SIGCHLD members of siginfo_t, padded to 128 bytes
    _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("pid", ctypes.c_int), ("uid", ctypes.c_uint),
                ("status", ctypes.c_int), ("_rest", ctypes.c_char * 100)]


class _Timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]


class _Rusage(ctypes.Structure):
    _fields_ = [("utime", _Timeval), ("stime", _Timeval), ("maxrss", ctypes.c_long),
                ("_rest", ctypes.c_long * 13)]


_siginfo, _rusage = _SigInfo(), _Rusage()  # made once, in the zygote


def exit_status(pidfd: int) -> tuple[int, float, float, int] | None:
    """The exit of an exited child, without reaping it: (wait status, user and system
    seconds, max RSS in KiB) from waitid(P_PIDFD, WEXITED|WNOWAIT) with its rusage
    (Linux's fifth argument); None if it has not exited. The zombie keeps its pid, so
    a pidfd on it still tells whoever reads its fdinfo the pid."""
    if _WAITID_NR is None:
        raise OSError(errno.ENOSYS, f"waitid on {platform.machine()}")
    _siginfo.pid = 0
    _check(_syscall(ctypes.c_long(_WAITID_NR), ctypes.c_long(P_PIDFD), ctypes.c_long(pidfd),
                    ctypes.byref(_siginfo), ctypes.c_long(WEXITED | WNOWAIT | WNOHANG),
                    ctypes.byref(_rusage)))
    if _siginfo.pid == 0:
        return None
    code, value = _siginfo.code, _siginfo.status
    if code == CLD_EXITED:
        status = (value & 0xFF) << 8
    else:
        status = (value & 0x7F) | (0x80 if code == CLD_DUMPED else 0)
    ru = _rusage
    return (status, ru.utime.sec + ru.utime.usec / 1e6, ru.stime.sec + ru.stime.usec / 1e6,
            ru.maxrss)
