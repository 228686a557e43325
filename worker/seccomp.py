"""The container's seccomp profile, loaded through the system's libseccomp (as runc does).

Takes the OCI ``linux.seccomp`` section: default action (and ``defaultErrnoRet``),
architectures, flags, and syscall rules with argument conditions. runc's rules are
kept: unknown syscall names are skipped, a rule whose action is the default action is
skipped, conditions on *different* arguments of one rule must all match (AND) while
several conditions on the *same* argument become one rule each (OR), and syscalls newer
than every syscall the profile names fail with ENOSYS instead of the default action (so
that, say, glibc falls back from clone3 to clone as it does under runc).

Where libseccomp is missing, a container with a profile cannot be exec'd into: failing
closed beats running the command less confined than ``runc exec`` would.

Each distinct profile is compiled once, by a throwaway child of the zygote
(``precompiled``), and the worker only installs the BPF program: building a filter costs
libseccomp a few MiB of heap, which would otherwise stay in every worker of a container
with a profile (and, built in the zygote itself, would unshare pages of every worker).
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import linux

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000


def _errno_action(ret: int) -> int:
    return 0x00050000 | (ret & 0xFFFF)


def _trace_action(ret: int) -> int:
    return 0x7FF00000 | (ret & 0xFFFF)


_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_ATTR_CTL_SSB = 7
_FLAG_ATTRS = {"SECCOMP_FILTER_FLAG_TSYNC": _ATTR_CTL_TSYNC, "SECCOMP_FILTER_FLAG_LOG": _ATTR_CTL_LOG,
               "SECCOMP_FILTER_FLAG_SPEC_ALLOW": _ATTR_CTL_SSB}
_MAX_SYSCALL = 1024


class SeccompError(OSError):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _open(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def _load_lib() -> ctypes.CDLL | None:
    lib = _open("libseccomp.so.2")
    if lib is None:
        # Not under its usual soname: ask ldconfig. Only then, since ctypes.util
        # imports subprocess and with it threading, whose at-fork hook costs every
        # worker the zygote forks some 0.35 MiB of private memory.
        from ctypes.util import find_library

        name = find_library("seccomp")
        lib = _open(name) if name else None
    if lib is None:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # char*, freed by us
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    return lib


_lib = _load_lib()
_libc = ctypes.CDLL(None)
_free = _libc.free
# Array types of rule conditions (ctypes makes one per length), made here once.
_CONDS = [_ArgCmp * n for n in range(1, 7)]


def action(name: str, ret: int | None) -> int:
    """An OCI action name as libseccomp's action value."""
    if name == "SCMP_ACT_ERRNO":
        return _errno_action(errno.EPERM if ret is None else ret)
    if name == "SCMP_ACT_TRACE":
        return _trace_action(errno.EPERM if ret is None else ret)
    table = {"SCMP_ACT_KILL": SCMP_ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": SCMP_ACT_KILL_THREAD,
             "SCMP_ACT_KILL_PROCESS": SCMP_ACT_KILL_PROCESS, "SCMP_ACT_TRAP": SCMP_ACT_TRAP,
             "SCMP_ACT_ALLOW": SCMP_ACT_ALLOW, "SCMP_ACT_LOG": SCMP_ACT_LOG}
    if name not in table:
        raise SeccompError(errno.EINVAL, f"seccomp action {name} is not supported")
    return table[name]


def rule_conditions(args: list[dict]) -> list[list[tuple[int, int, int, int]]]:
    """The profile's conditions as libseccomp rules: AND across arguments, one rule per
    condition (OR) when any argument index repeats."""
    conds = [(a["index"], _OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0)) for a in args]
    indexes = [c[0] for c in conds]
    if len(set(indexes)) < len(indexes):
        return [[c] for c in conds]
    return [conds]


_FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
          "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}


def precompiled(profile: dict) -> dict:
    """The profile as the worker loads it: {"bpf", "flags"}, or {"error", "errno"}.
    Run in a throwaway process (see the zygote): it leaves libseccomp's heap behind."""
    try:
        bpf, flags = compile_filter(profile)
    except OSError as exc:
        return {"error": str(exc.strerror or exc), "errno": exc.errno or errno.EINVAL}
    except Exception as exc:  # noqa: BLE001 - a malformed profile is the worker's error to report
        return {"error": f"seccomp profile: {exc!r}", "errno": errno.EINVAL}
    return {"bpf": bpf, "flags": flags}


def load(profile: dict) -> None:
    """Load the filter into the calling thread (and its future children): the program
    ``precompiled`` made, or else compiled here."""
    compiled = (profile["bpf"], profile.get("flags", 0)) if "bpf" in profile else compile_filter(profile)
    try:
        linux.seccomp_filter(*compiled)
    except OSError as exc:
        raise SeccompError(exc.errno, f"seccomp load: {exc.strerror}") from None


def compile_filter(profile: dict) -> tuple[bytes, int]:
    """(the BPF program, seccomp(2) flags) for an OCI profile, through libseccomp."""
    if _lib is None:
        raise SeccompError(errno.ENOSYS, "the container has a seccomp profile but libseccomp "
                                         "is not installed")
    if "error" in profile:
        raise SeccompError(profile.get("errno", errno.EINVAL), profile["error"])
    default = action(profile.get("defaultAction", "SCMP_ACT_ALLOW"), profile.get("defaultErrnoRet"))
    flags = 0
    for flag in profile.get("flags") or ():
        flags |= _FLAGS.get(flag, 0)
    ctx = _lib.seccomp_init(default)
    if not ctx:
        raise SeccompError(errno.EINVAL, "seccomp_init failed")
    try:
        _check(_lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 0), "attr nnp")  # we set it ourselves
        for flag in profile.get("flags") or ():
            if flag in _FLAG_ATTRS:
                _check(_lib.seccomp_attr_set(ctx, _FLAG_ATTRS[flag], 1), flag)
        for arch in profile.get("architectures") or ():
            token = _lib.seccomp_arch_resolve_name(arch.lower().replace("scmp_arch_", "").encode())
            if token:
                rc = _lib.seccomp_arch_add(ctx, token)
                if rc not in (0, -errno.EEXIST):
                    _check(rc, f"arch {arch}")
        named = _add_rules(ctx, profile, default)
        if default not in (SCMP_ACT_ALLOW, SCMP_ACT_LOG) and named:
            _enosys_above(ctx, max(named))
        out = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            _check(_lib.seccomp_export_bpf(ctx, out), "export")
            return os.pread(out, 1 << 20, 0), flags
        finally:
            os.close(out)
    finally:
        _lib.seccomp_release(ctx)


def _add_rules(ctx: int, profile: dict, default: int) -> list[int]:
    named: list[int] = []
    for call in profile.get("syscalls") or ():
        act = action(call["action"], call.get("errnoRet"))
        for name in call.get("names") or ():
            nr = _lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # unknown to this libseccomp/arch: skipped, as runc does
            named.append(nr)
            if act == default:
                continue
            for conds in rule_conditions(call.get("args") or []):
                n = max(1, len(conds))
                arr = (_CONDS[n - 1] if n <= len(_CONDS) else _ArgCmp * n)(*[_ArgCmp(*c) for c in conds])
                _check(_lib.seccomp_rule_add_array(ctx, act, nr, len(conds), arr), f"rule {name}")
    return named


def _enosys_above(ctx: int, highest: int) -> None:
    native = _lib.seccomp_arch_native()
    for nr in range(highest + 1, _MAX_SYSCALL):
        ptr = _lib.seccomp_syscall_resolve_num_arch(native, nr)
        if ptr:
            _free(ctypes.c_void_p(ptr))
            _lib.seccomp_rule_add_array(ctx, _errno_action(errno.ENOSYS), nr, 0, None)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise SeccompError(-rc, f"seccomp {what}: {os.strerror(-rc)}")
