"""Finding containers and what an exec into each must get.

A runc-format state root (runc, containerd's runc shim, Docker, CRI-O) holds
``<root>/<id>/state.json`` (libcontainer's state: init pid and start time, cgroup
paths, namespace paths, the container config) and points at the OCI bundle, whose
``config.json`` has the ``process`` section that ``runc exec`` starts from (env, cwd,
user, capabilities, rlimits, noNewPrivileges). crun's roots hold ``<root>/<id>/status``
and a copy of ``config.json`` instead (``from_crun``). The result is a
:class:`Container`, plain data that travels to the worker as its spec.

``from_pid`` builds the same for any process (``attach NAME --pid PID``): the exec then
gets that process's own namespaces, cgroups and credentials.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

from ..protocol.caps import CAP_NAMES

DEFAULT_ROOTS = ("/run/runc", "/run/containerd/runc/*", "/run/docker/runtime-runc/*", "/run/crun")
NS_NAMES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAP_KEYS = ("bounding", "effective", "permitted", "inheritable", "ambient")


class DiscoveryError(Exception):
    pass


@dataclass
class Container:
    id: str
    init_pid: int
    init_start: int | None
    namespaces: list[str]
    cgroup_procs: list[str]
    process: dict
    source: str  # state root, or "attach"
    labels: dict = field(default_factory=dict)
    keyring: str | None = None

    def kubernetes(self) -> tuple[str | None, str | None]:
        """(pod, namespace) from the annotations CRI-O and containerd's CRI plugin write."""
        a = self.labels
        return (a.get("io.kubernetes.pod.name") or a.get("io.kubernetes.cri.sandbox-name"),
                a.get("io.kubernetes.pod.namespace") or a.get("io.kubernetes.cri.sandbox-namespace"))

    def cri_container_type(self) -> str | None:
        """"container" or "sandbox" (a pod's), from containerd's CRI plugin's annotation or
        CRI-O's; None for a container no CRI runtime made."""
        a = self.labels
        return a.get("io.kubernetes.cri.container-type") or a.get("io.kubernetes.cri-o.ContainerType")

    def spec(self) -> dict:
        """What the worker needs, as a msgpack-able map."""
        return {"id": self.id, "init_pid": self.init_pid, "init_start": self.init_start,
                "namespaces": self.namespaces, "cgroup_procs": self.cgroup_procs,
                "process": self.process, "keyring": self.keyring}


def expand_roots(patterns: list[str]) -> list[str]:
    roots: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]:
            if os.path.isdir(path) and path not in roots:
                roots.append(path)
    return roots


STATE_FILES = ("state.json", "status")  # runc's (and its kin's), crun's


def scan(root: str) -> dict[str, str]:
    """Container id -> directory, for every container directory under a root.

    A directory whose state file is not written yet is listed too, so that it can be
    watched for the file's arrival."""
    try:
        with os.scandir(root) as entries:
            return {e.name: e.path for e in entries if e.is_dir()}
    except FileNotFoundError:
        return {}  # the root is gone: so are its containers
    except OSError as exc:  # EMFILE, EACCES...: we know nothing, which is not "none"
        raise DiscoveryError(f"cannot list {root}: {exc.strerror}") from None


def state_file(directory: str) -> str | None:
    for name in STATE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load(root: str, cid: str, path: str) -> Container:
    """The container whose state file is path, whichever runtime wrote it."""
    return from_crun(root, cid, path) if os.path.basename(path) == "status" else from_state(root, cid, path)


def joinable_namespaces(pid: int) -> list[str]:
    """Namespaces of pid that differ from ours: only those are joined."""
    out = []
    for name in NS_NAMES:
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{name}").st_ino
            ours = os.stat(f"/proc/self/ns/{name}").st_ino
        except FileNotFoundError:
            continue  # kernel without that namespace type
        except OSError as exc:
            raise DiscoveryError(f"cannot read namespaces of pid {pid}: {exc.strerror}") from None
        if theirs != ours:
            out.append(name)
    return out


def _procs_files(dirs: list[str]) -> list[str]:
    out = []
    for d in dirs:
        path = os.path.join(d, "cgroup.procs")
        real = os.path.realpath(path)
        if os.path.exists(real) and real not in out:
            out.append(real)
    return out


def from_state(root: str, cid: str, state_path: str) -> Container:
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise DiscoveryError(f"{state_path}: {exc}") from None
    cfg = state.get("config") or {}
    labels = dict(item.split("=", 1) for item in cfg.get("labels") or [] if "=" in item)
    oci = _load_bundle(labels.get("bundle"))
    pid = state.get("init_process_pid")
    if not isinstance(pid, int) or pid <= 0:
        raise DiscoveryError(f"{state_path}: no init pid")
    process = _process(oci.get("process") or {}, cfg)
    process["seccomp"] = (oci.get("linux") or {}).get("seccomp")
    process["refuse"] = _unapplied_lsm(oci.get("process") or {})
    if not oci and cfg.get("seccomp"):  # fail closed: never exec less confined than runc
        process["seccomp"] = {"error": f"{cid}: the bundle's config.json is unreadable, so its "
                                       "seccomp profile cannot be applied"}
    annotations = oci.get("annotations") or {}
    return Container(
        id=cid, init_pid=pid, init_start=state.get("init_process_start"),
        namespaces=joinable_namespaces(pid),
        cgroup_procs=_procs_files(list((state.get("cgroup_paths") or {}).values())),
        process=process, source=root, labels={**labels, **annotations},
        keyring=None if cfg.get("no_new_keyring") else f"_ses.{cid}")


def from_crun(root: str, cid: str, status_path: str) -> Container:
    """crun's layout: ``<root>/<id>/status`` (init pid, start time, cgroup path) beside a
    copy of the bundle's ``config.json``. Cgroups are read from the init's
    /proc/PID/cgroup, which is right for crun's v1 and v2 layouts alike."""
    try:
        with open(status_path) as f:
            status = json.load(f)
    except (OSError, ValueError) as exc:
        raise DiscoveryError(f"{status_path}: {exc}") from None
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise DiscoveryError(f"{status_path}: no init pid")
    oci = _load_bundle(os.path.dirname(status_path)) or _load_bundle(status.get("bundle"))
    if not oci:
        raise DiscoveryError(f"{cid}: no config.json beside crun's status or in its bundle")
    proc = oci.get("process") or {}
    process = _process(proc, {})
    process["seccomp"] = (oci.get("linux") or {}).get("seccomp")
    process["refuse"] = _unapplied_lsm(proc)
    try:
        cgroups = _host_cgroup_dirs(pid)
    except OSError as exc:
        raise DiscoveryError(f"cannot inspect pid {pid}: {exc.strerror}") from None
    return Container(
        id=cid, init_pid=pid, init_start=status.get("process-start-time"),
        namespaces=joinable_namespaces(pid), cgroup_procs=_procs_files(cgroups),
        process=process, source=root, labels=dict(oci.get("annotations") or {}))


def _load_bundle(bundle: str | None) -> dict:
    if not bundle:
        return {}
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # bundle gone: fall back to the libcontainer config in state.json


def _process(proc: dict, cfg: dict) -> dict:
    """The exec defaults, from the OCI process section, else libcontainer's config."""
    user = proc.get("user") or {}
    caps = proc.get("capabilities") or {k.lower(): v for k, v in (cfg.get("capabilities") or {}).items()}
    rlimits = [[r["type"], r["soft"], r["hard"]] for r in proc.get("rlimits") or []]
    if not rlimits:
        rlimits = [[_RLIMIT_NAMES.get(r.get("type"), ""), r.get("soft"), r.get("hard")]
                   for r in cfg.get("rlimits") or []]
    umask = user.get("umask", cfg.get("umask"))
    return {
        "user": {"uid": user.get("uid", 0), "gid": user.get("gid", 0),
                 "additional_gids": user.get("additionalGids") or []},
        "env": proc.get("env") or [DEFAULT_PATH],
        "cwd": proc.get("cwd") or "/",
        "caps": {k: caps.get(k) or [] for k in _CAP_KEYS},
        "no_new_privs": bool(proc.get("noNewPrivileges", cfg.get("no_new_privileges", False))),
        "rlimits": [r for r in rlimits if r[0]],
        "umask": 0o022 if umask is None else umask,
        "oom_score_adj": proc.get("oomScoreAdj", cfg.get("oom_score_adj")),
    }


def _unapplied_lsm(proc: dict) -> str | None:
    """A reason to refuse execs: an LSM label this host enforces but warmexec does not
    apply yet. Where the kernel lacks the LSM, runc ignores the label too."""
    if proc.get("apparmorProfile") and os.path.exists("/sys/kernel/security/apparmor"):
        return "the container has an AppArmor profile, which warmexec does not apply yet"
    if proc.get("selinuxLabel") and os.path.exists("/sys/fs/selinux/enforce"):
        return "the container has an SELinux label, which warmexec does not apply yet"
    return None


_RLIMIT_NAMES = dict(enumerate((
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME")))


# ---- attach: any process, of any runtime ------------------------------------------

def from_pid(name: str, pid: int) -> Container:
    try:
        status = _status(pid)
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = [e.decode(errors="replace") for e in f.read().split(b"\0") if e]
        start = start_time(pid)
        cgroups = _host_cgroup_dirs(pid)
        limits = _limits(pid)
    except OSError as exc:
        raise DiscoveryError(f"cannot inspect pid {pid}: {exc.strerror}") from None
    uids, gids = status["Uid"].split(), status["Gid"].split()
    caps = {k: _cap_names(int(status.get(field, "0"), 16)) for k, field in _STATUS_CAPS.items()}
    process = {
        "user": {"uid": int(uids[1]), "gid": int(gids[1]),
                 "additional_gids": [int(g) for g in status.get("Groups", "").split()]},
        "env": env or [DEFAULT_PATH], "cwd": "/", "caps": caps,
        "no_new_privs": status.get("NoNewPrivs", "0").strip() == "1",
        "rlimits": limits, "umask": int(status.get("Umask", "0022"), 8), "oom_score_adj": None,
    }
    return Container(id=name, init_pid=pid, init_start=start, namespaces=joinable_namespaces(pid),
                     cgroup_procs=_procs_files(cgroups), process=process, source="attach")


_STATUS_CAPS = {"bounding": "CapBnd", "effective": "CapEff", "permitted": "CapPrm",
                "inheritable": "CapInh", "ambient": "CapAmb"}


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def _cap_names(mask: int) -> list[str]:
    return [n for i, n in enumerate(CAP_NAMES) if mask >> i & 1]


_LIMIT_ROWS = {"Max cpu time": "RLIMIT_CPU", "Max file size": "RLIMIT_FSIZE",
               "Max data size": "RLIMIT_DATA", "Max stack size": "RLIMIT_STACK",
               "Max core file size": "RLIMIT_CORE", "Max processes": "RLIMIT_NPROC",
               "Max open files": "RLIMIT_NOFILE", "Max locked memory": "RLIMIT_MEMLOCK",
               "Max address space": "RLIMIT_AS", "Max msgqueue size": "RLIMIT_MSGQUEUE"}


def _limits(pid: int) -> list[list]:
    out = []
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            for label, name in _LIMIT_ROWS.items():
                if line.startswith(label):
                    soft, hard = line[len(label):].split()[:2]
                    out.append([name, _limit(soft), _limit(hard)])
    return out


def _limit(text: str) -> int:
    return 2**64 - 1 if text == "unlimited" else int(text)


def _host_cgroup_dirs(pid: int) -> list[str]:
    """Host paths of pid's cgroups, from /proc/PID/cgroup and our mountinfo."""
    mounts: dict[str, tuple[str, str]] = {}  # controller set ("" for v2) -> (root, mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            root, point = left.split()[3:5]
            if fstype == "cgroup2":
                mounts.setdefault("", (root, point))
            elif fstype == "cgroup":
                ctl = ",".join(sorted(o for o in opts.split(",")
                                      if o not in ("rw", "ro", "nosuid", "nodev", "noexec", "relatime")))
                mounts.setdefault(ctl, (root, point))
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctl, path = line.rstrip("\n").split(":", 2)
            key = ",".join(sorted(ctl.split(","))) if ctl else ""
            if key in mounts:
                root, point = mounts[key]
                rel = path[len(root):] if root != "/" and path.startswith(root) else path
                dirs.append(point + rel)
    return dirs
