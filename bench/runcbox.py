"""Real busybox containers under a private ``runc --root``, for tests, bench and demo.

Never touches the host's containers: every container lives under its own state root
and gets an id unique to this process, so its default cgroup path cannot collide.
runc's stdio goes to a log file (``runc run -d`` hands the container the caller's
stdio, and a caller reading a pipe would wait forever for EOF).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import time

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
wheel:x:10:alice
audio:x:29:alice,bob
alice:x:1000:
bob:x:1001:
nogroup:x:65534:
"""


def make_rootfs(path: str, passwd: str = PASSWD, group: str = GROUP) -> str:
    """A busybox-static rootfs at path (kept if already there): every applet, the given
    passwd and group, a non-executable /bin/notexec, a root-only /secret."""
    if os.path.isdir(path):
        return path
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/alice", "home/bob", "secret"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin/busybox"))
    listing = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    applets = listing.stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", os.path.join(path, "bin", applet))
    for name, text in (("passwd", passwd), ("group", group), ("hostname", "box\n")):
        with open(os.path.join(path, "etc", name), "w") as f:
            f.write(text)
    with open(os.path.join(path, "bin/notexec"), "w") as f:
        f.write("#!/bin/sh\necho never\n")
    os.chmod(os.path.join(path, "bin/notexec"), 0o644)
    os.chown(os.path.join(path, "home/alice"), 1000, 1000)
    os.chmod(os.path.join(path, "secret"), 0o700)
    os.chmod(os.path.join(path, "tmp"), 0o1777)
    return path


def _runc_spec() -> dict:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["runc", "spec"], cwd=d, check=True)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


class RuncBox:
    """A private runc state root and the bundles of its containers."""

    def __init__(self, workdir: str | None = None) -> None:
        self.dir = workdir or tempfile.mkdtemp(prefix="warmexec-runc-")
        self.root = os.path.join(self.dir, "state")
        os.makedirs(self.root, exist_ok=True)
        self._spec = _runc_spec()
        self._rootfs = make_rootfs(os.path.join(self.dir, "rootfs-template"))
        self.prefix = f"we{os.getpid()}-"
        self.ids: list[str] = []

    def config(self, **process: object) -> dict:
        """runc's default spec with a long-running busybox init; process keys override."""
        cfg = copy.deepcopy(self._spec)
        cfg["process"].update({"terminal": False, "args": ["sleep", "1000000"]})
        cfg["process"].update(process)
        cfg["root"] = {"path": "rootfs", "readonly": False}
        return cfg

    def run(self, name: str, cfg: dict | None = None, userns_base: int | None = None,
            shared_rootfs: bool = False) -> str:
        """Start a container; return its runc id.

        With userns_base, the container gets its own user namespace mapping ids 0-65535
        to userns_base..userns_base+65535 on the host, and its rootfs is chowned to match.
        With shared_rootfs, no copy is made: the container gets the template rootfs,
        read-only (many containers start much faster; none of them can write to it).
        """
        if shared_rootfs and userns_base is not None:
            raise ValueError("a shared rootfs cannot be chowned for a user namespace")
        cid = self.prefix + name
        bundle = os.path.join(self.dir, "bundles", cid)
        if os.path.exists(bundle):
            shutil.rmtree(bundle)
        os.makedirs(bundle)
        rootfs = os.path.join(bundle, "rootfs")
        cfg = cfg or self.config()
        if shared_rootfs:
            cfg = {**cfg, "root": {"path": self._rootfs, "readonly": True}}
        else:
            subprocess.run(["cp", "-a", self._rootfs, rootfs], check=True)  # keeps owners and modes
        if userns_base is not None:
            cfg = map_user_namespace(cfg, rootfs, userns_base)
            for d in (self.dir, os.path.dirname(bundle), bundle):
                os.chmod(d, 0o711)  # the mapped root must be able to reach its rootfs
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(bundle, "runc.log"), "wb") as log:
            subprocess.run(["runc", "--root", self.root, "run", "-d", "--pid-file",
                            os.path.join(bundle, "pid"), cid], cwd=bundle, stdin=subprocess.DEVNULL,
                           stdout=log, stderr=log, check=True, timeout=30)
        self.ids.append(cid)
        return cid

    def exec(self, cid: str, argv: list[str], *, user: str | None = None, cwd: str | None = None,
             env: dict[str, str] | None = None, additional_gids: list[int] = (),
             process: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """``runc exec``: the reference every warmexec attribute is compared with."""
        cmd = ["runc", "--root", self.root, "exec"]
        if user:
            cmd += ["--user", user]
        if cwd:
            cmd += ["--cwd", cwd]
        for k, v in (env or {}).items():
            cmd += ["--env", f"{k}={v}"]
        for g in additional_gids:
            cmd += ["--additional-gids", str(g)]
        if process is not None:
            path = os.path.join(self.dir, f"process-{cid}.json")
            with open(path, "w") as f:
                json.dump(process, f)
            cmd += ["--process", path, cid]
        else:
            cmd += [cid, *argv]
        return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def bundle_config(self, cid: str) -> dict:
        with open(os.path.join(self.dir, "bundles", cid, "config.json")) as f:
            return json.load(f)

    def init_pid(self, cid: str) -> int:
        with open(os.path.join(self.root, cid, "state.json")) as f:
            return json.load(f)["init_process_pid"]

    def kill(self, cid: str, signal: str = "KILL") -> None:
        subprocess.run(["runc", "--root", self.root, "kill", cid, signal], capture_output=True)

    def delete(self, cid: str) -> None:
        subprocess.run(["runc", "--root", self.root, "delete", "--force", cid], capture_output=True)
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.join(self.root, cid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if cid in self.ids:
            self.ids.remove(cid)

    def cleanup(self) -> None:
        for cid in list(self.ids):
            self.delete(cid)
        shutil.rmtree(self.dir, ignore_errors=True)

    def listed(self) -> list[str]:
        """Every container runc knows under this box's root, including any whose
        ``run`` failed half-way (and so is not in ``ids``)."""
        out = subprocess.run(["runc", "--root", self.root, "list", "-q"], capture_output=True, text=True)
        return out.stdout.split()


def map_user_namespace(cfg: dict, rootfs: str, base: int) -> dict:
    """A copy of cfg with a user namespace mapping 0-65535 to base.., rootfs chowned."""
    cfg = copy.deepcopy(cfg)
    cfg["linux"]["namespaces"].append({"type": "user"})
    mapping = [{"containerID": 0, "hostID": base, "size": 65536}]
    cfg["linux"]["uidMappings"] = mapping
    cfg["linux"]["gidMappings"] = copy.deepcopy(mapping)
    def shift(path: str) -> None:
        st = os.lstat(path)
        os.lchown(path, base + st.st_uid, base + st.st_gid)

    shift(rootfs)
    for top, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            shift(os.path.join(top, name))
    return cfg
