"""Containers as their users know them: by name, engine and unique id prefix.

* **Docker**: the container's name (``web`` or ``/web``), from the Engine API over its
  socket (the ``docker`` SDK, in a thread of its own: ``DockerNames``), re-listed on
  every container event, so renames and restarts are followed. The engine may be down
  or absent: its containers are then served by id, and runc containers never need it.
* **containerd**: ``NAMESPACE/ID`` (the namespace is the state root's last component,
  ``/run/containerd/runc/NAMESPACE``).
* **Kubernetes** (containerd's CRI plugin, CRI-O): ``NAMESPACE/POD/CONTAINER`` from the
  CRI annotations on the container's spec.
* **Any engine**: the id itself, or any prefix of it that names one served container;
  an ambiguous prefix is an error that names the matches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol import errors
from ..protocol.errors import WarmexecError
from .discovery import Container

log = logging.getLogger("warmexec")

#: Docker events after which the container list is read again.
RELIST_ON = frozenset(("create", "rename", "destroy", "start", "restart"))
RETRY_MAX = 30.0  # seconds between attempts to reach a Docker engine that is down
MAX_MATCHES_SHOWN = 5


@dataclass(frozen=True)
class DockerHealth:
    """A container's HEALTHCHECK as the engine has it (Config.Healthcheck; durations in ns)."""

    test: tuple[str, ...]  # ("CMD", arg...), ("CMD-SHELL", command), ("NONE",)
    interval: int = 0  # 0: docker's default
    timeout: int = 0
    retries: int = 0
    start_period: int = 0
    shell: tuple[str, ...] = ()  # Config.Shell: what CMD-SHELL runs in (default /bin/sh -c)


@dataclass(frozen=True)
class DockerInfo:
    name: str  # without the leading "/"
    image: str
    health: DockerHealth | None = None  # read only with docker_healthchecks = true


def engine(info: Container) -> tuple[str, str | None]:
    """(engine, containerd namespace): from the bundle containerd's shim made, whose
    path is ``.../io.containerd.runtime.v2.task/NAMESPACE/ID`` wherever its state lives
    (Docker's namespace is ``moby``), else from where the container's state lives."""
    if info.source == "attach":
        return "attached", None
    root = info.source.rstrip("/")
    parent, ns = os.path.split(root)
    bundle_ns = _bundle_namespace(info.labels.get("bundle") or "")
    if bundle_ns is not None:
        ns = bundle_ns
    if ns == "moby" and (bundle_ns is not None or os.path.basename(parent) == "runtime-runc"):
        return "docker", None
    if info.labels.get("io.kubernetes.cri-o.ContainerType"):  # CRI-O's, under its runc or crun root
        return "cri-o", None
    if info.labels.get("io.kubernetes.cri.container-type") or info.labels.get("io.kubernetes.pod.name"):
        return ("cri-o", None) if "crio" in root or "cri-o" in root else ("cri", ns)
    if bundle_ns is not None or (os.path.basename(parent) == "runc" and "containerd" in parent):
        return "containerd", ns
    if "crun" in root:
        return "crun", None
    return "runc", None


def _bundle_namespace(bundle: str) -> str | None:
    parent = os.path.dirname(bundle.rstrip("/"))
    if os.path.basename(os.path.dirname(parent)) == "io.containerd.runtime.v2.task":
        return os.path.basename(parent)
    return None


def aliases(info: Container) -> list[str]:
    """The names a container has from its engine's layout and annotations alone."""
    kind, ns = engine(info)
    out = []
    if kind in ("containerd", "cri") and ns:
        out.append(f"{ns}/{info.id}")
    labels = info.labels
    pod, pod_ns = info.kubernetes()
    name = labels.get("io.kubernetes.cri.container-name") or labels.get("io.kubernetes.container.name")
    if pod and pod_ns and name:
        out.append(f"{pod_ns}/{pod}/{name}")
    return out


def image(info: Container, docker: DockerInfo | None) -> str | None:
    if docker is not None:
        return docker.image
    return info.labels.get("io.kubernetes.cri.image-name") or info.labels.get("io.kubernetes.container.image")


class Names:
    """Every name that leads to a served container (its id is always one)."""

    def __init__(self) -> None:
        self.docker: dict[str, DockerInfo] = {}  # id -> what the Engine API says
        self._by_docker_name: dict[str, str] = {}
        self._aliases: dict[str, set[str]] = {}  # alias -> the ids that claim it
        self._of: dict[str, list[str]] = {}  # id -> its aliases

    def set_docker(self, containers: dict[str, DockerInfo]) -> None:
        self.docker = containers
        self._by_docker_name = {d.name: cid for cid, d in containers.items()}

    def add(self, info: Container) -> None:
        self._of[info.id] = aliases(info)
        for alias in self._of[info.id]:
            self._aliases.setdefault(alias, set()).add(info.id)

    def remove(self, cid: str) -> None:
        for alias in self._of.pop(cid, []):
            claims = self._aliases.get(alias, set())
            claims.discard(cid)
            if not claims:
                self._aliases.pop(alias, None)

    def name(self, cid: str) -> str | None:
        """What `ls` shows as its name."""
        found = self.docker.get(cid)
        if found is not None:
            return found.name
        own = self._of.get(cid)
        return own[-1] if own else None

    def known_as(self, cid: str) -> list[str]:
        """Every name of cid: its id, its Docker name, its aliases (probe selectors)."""
        found = self.docker.get(cid)
        return [cid, *([found.name] if found is not None else []), *self._of.get(cid, [])]

    def resolve(self, ref: str, ids: Iterable[str]) -> str | None:
        """The id ref names (a name, an alias, or a unique prefix of one of ids), None
        if it names none; WarmexecError if it is a prefix of several."""
        cid = self._by_docker_name.get(ref[1:] if ref.startswith("/") else ref)
        if cid is not None:
            return cid
        claims = self._aliases.get(ref)
        if claims:  # annotations come with a container's spec: two may claim one name
            if len(claims) > 1:
                raise WarmexecError(errors.AMBIGUOUS, f"{len(claims)} containers are named {ref}: "
                                                      f"{', '.join(sorted(claims)[:MAX_MATCHES_SHOWN])}")
            return next(iter(claims))
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) > 1:
            shown = ", ".join(sorted(matches)[:MAX_MATCHES_SHOWN])
            more = f" and {len(matches) - MAX_MATCHES_SHOWN} more" if len(matches) > MAX_MATCHES_SHOWN else ""
            raise WarmexecError(errors.AMBIGUOUS,
                                f"{len(matches)} containers match the prefix {ref}: {shown}{more}")
        return matches[0] if matches else None


class DockerNames:
    """A thread that keeps Docker's container list (id -> name, image) and hands each new
    one to ``deliver`` on the supervisor's loop (through ``fd``, which turns readable).
    It never blocks the loop, and an engine that is down only delays names."""

    def __init__(self, host: str, healthchecks: bool = False) -> None:
        self.host = host
        self.healthchecks = healthchecks  # also inspect each new container for its HEALTHCHECK
        self._health: dict[str, DockerHealth | None] = {}  # id -> its healthcheck (fixed for its life)
        self.updates: queue.SimpleQueue[dict[str, DockerInfo]] = queue.SimpleQueue()
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="warmexec-docker-names", daemon=True)
        self._thread.start()

    def drain(self) -> dict[str, DockerInfo] | None:
        """The newest list, if one came since the last call (on the loop's thread)."""
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        latest = None
        while True:
            try:
                latest = self.updates.get_nowait()
            except queue.Empty:
                return latest

    def _publish(self, containers: dict[str, DockerInfo]) -> None:
        self.updates.put(containers)
        try:
            os.write(self._wake, b"x")
        except BlockingIOError:
            pass  # the loop has a wake-up pending already

    def _run(self) -> None:
        delay = 1.0
        path = self.host[len("unix://"):] if self.host.startswith("unix://") else None
        while True:
            if path is not None and not os.path.exists(path):
                time.sleep(RETRY_MAX)  # no engine here (yet): look again now and then
                continue
            try:
                self._follow()
                delay = 1.0
            except Exception as exc:  # noqa: BLE001 - any failure of the engine or the SDK
                log.debug("docker names from %s: %s", self.host, exc)
            time.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    def _follow(self) -> None:
        import docker  # noqa: PLC0415 - only where a Docker engine is configured

        client = docker.DockerClient(base_url=self.host, timeout=10)
        try:
            # Only the events that change names: a docker exec's own events (several per
            # exec) must cost the supervisor nothing.
            events = client.api.events(decode=True, filters={"type": "container", "event": sorted(RELIST_ON)})
            self._publish(self._with_health(client, _listed(client.api.containers(all=True))))  # no gap
            for event in events:
                if event.get("Action", "").split(":")[0] in RELIST_ON:  # the engine filters too
                    self._publish(self._with_health(client, _listed(client.api.containers(all=True))))
        finally:
            client.close()


    def _with_health(self, client: object, listed: dict[str, DockerInfo]) -> dict[str, DockerInfo]:
        """With docker_healthchecks, each container's HEALTHCHECK: one inspect per new
        container (a container's config does not change), forgotten when it goes."""
        if not self.healthchecks:
            return listed
        self._health = {cid: h for cid, h in self._health.items() if cid in listed}
        for cid in listed:
            if cid not in self._health:
                try:
                    self._health[cid] = docker_health(client.api.inspect_container(cid).get("Config") or {})
                except Exception as exc:  # noqa: BLE001 - gone meanwhile, or the engine failed: next list
                    log.debug("docker inspect %s: %s", cid[:12], exc)
                    continue
        return {cid: DockerInfo(d.name, d.image, self._health.get(cid)) for cid, d in listed.items()}


def docker_health(config: dict) -> DockerHealth | None:
    """Config.Healthcheck (and Config.Shell) of docker's inspect, checked: None if absent,
    disabled (NONE) or malformed."""
    hc = config.get("Healthcheck")
    if not isinstance(hc, dict):
        return None
    test = hc.get("Test")
    if not isinstance(test, list) or not test or not all(isinstance(t, str) for t in test):
        return None
    if test[0] not in ("CMD", "CMD-SHELL") or len(test) < 2:  # NONE: disabled by the image or run
        return None
    shell = config.get("Shell")
    shell = tuple(shell) if isinstance(shell, list) and all(isinstance(x, str) for x in shell) else ()
    fields = {"interval": "Interval", "timeout": "Timeout", "retries": "Retries",
              "start_period": "StartPeriod"}
    ints = {k: v if type(v := hc.get(key)) is int and v >= 0 else 0 for k, key in fields.items()}
    return DockerHealth(tuple(test), shell=shell, **ints)


def _listed(rows: list[dict]) -> dict[str, DockerInfo]:
    out = {}
    for row in rows:
        names = row.get("Names") or []
        if row.get("Id") and names:
            out[row["Id"]] = DockerInfo(names[0].lstrip("/"), row.get("Image") or "")
    return out

