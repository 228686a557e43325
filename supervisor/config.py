"""The supervisor's configuration: one frozen object, every default in one place.

``warmexec serve --config FILE`` reads a TOML file; command-line flags win over it::

    endpoint = "ipc:///run/warmexec/warmexec.sock"
    runc_roots = ["/run/runc"]
    metrics_addr = "127.0.0.1:9750"
    container_label = true
    scan_interval = 2.0
    events = "ipc:///run/warmexec/events.sock"
    docker_host = "unix:///var/run/docker.sock"   # "" to read no Docker names
    docker_healthchecks = false  # true: Docker containers' HEALTHCHECKs run as scheduled probes

    [limits]
    max_inflight = 1024
    max_inflight_per_container = 256
    max_probes_inflight = 64     # scheduled probes ([[probes]]) running at once

    [[hooks.start]]              # once the exec's pid is known
    command = ["/usr/local/bin/audit-exec"]
    timeout = 5                  # seconds; the hook is killed after it

    [[hooks.exit]]               # once its wait status is known
    command = ["logger", "-t", "warmexec"]

    [auth]                       # CurveZMQ, for tcp:// endpoints (see auth.py)

    [probe_modules.alive]        # GET /probe?container=C&module=alive (probeconfig.py)
    argv = ["cat", "/tmp/healthy"]
    timeout = 2

    [[probes]]                   # scheduled in the supervisor (probeconfig.py, scheduler.py)
    name = "alive"
    module = "alive"
    period = 10
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..protocol.client import DEFAULT_ENDPOINT
from .discovery import DEFAULT_ROOTS
from .probeconfig import ProbeModule, ProbeSpec, parse_modules, parse_probes


class ConfigError(SystemExit):
    pass


@dataclass(frozen=True)
class Config:
    endpoint: str = DEFAULT_ENDPOINT
    runc_roots: tuple[str, ...] = DEFAULT_ROOTS
    metrics_addr: str | None = None  # HOST:PORT of the Prometheus endpoint
    container_label: bool = True  # label exec metrics with the container (False: thousands)
    scan_interval: float = 2.0  # seconds between full rescans (inotify sees changes at once)
    max_inflight: int = 1024  # execs received and not yet answered, in all
    max_inflight_per_container: int = 256
    hooks: dict[str, Any] = field(default_factory=dict)  # {"start": [...], "exit": [...], "python": [...]}
    auth: dict[str, Any] | None = None  # the [auth] table: CurveZMQ keys
    acl: dict[str, dict] = field(default_factory=dict)  # per client key: what it may do
    insecure_tcp: bool = False  # serve tcp:// without CurveZMQ
    events: str | None = None  # the event stream's PUB endpoint
    docker_host: str = "unix:///var/run/docker.sock"  # Docker's names from its API ("": none)
    probe_modules: dict[str, ProbeModule] = field(default_factory=dict)  # what /probe may run
    probes: tuple[ProbeSpec, ...] = ()  # scheduled probes (scheduler.py)
    max_probes_inflight: int = 64  # scheduled probes in flight at once: the rest wait a period
    docker_healthchecks: bool = False  # run Docker containers' HEALTHCHECKs as scheduled probes

    def with_flags(self, **flags: Any) -> Config:
        """This config with the flags that were given (None: not given) in its place."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})


def load_config(path: str | None) -> Config:
    """The TOML file's settings over the defaults (no file: the defaults)."""
    if not path:
        return Config()
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"warmexec: cannot read config {path}: {exc}") from None
    hooks = cfg.get("hooks", {})
    for kind in ("start", "exit"):
        for hook in hooks.get(kind, []):
            cmd = hook.get("command")
            if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
                raise ConfigError(f"warmexec: {path}: hooks.{kind}.command must be a list of strings")
            if not isinstance(hook.get("timeout", 5), (int, float)):
                raise ConfigError(f"warmexec: {path}: hooks.{kind}.timeout must be a number")
    try:
        modules = parse_modules(cfg.get("probe_modules"))
        probes = parse_probes(cfg.get("probes"), modules)
    except ValueError as exc:
        raise ConfigError(f"warmexec: {path}: {exc}") from None
    if not isinstance(cfg.get("docker_healthchecks", False), bool):
        raise ConfigError(f"warmexec: {path}: docker_healthchecks must be true or false")
    limits = cfg.get("limits", {})
    roots = cfg.get("runc_roots")
    return Config().with_flags(
        endpoint=cfg.get("endpoint"), runc_roots=tuple(roots) if roots else None,
        metrics_addr=cfg.get("metrics_addr"), container_label=cfg.get("container_label"),
        scan_interval=cfg.get("scan_interval"), max_inflight=limits.get("max_inflight"),
        max_inflight_per_container=limits.get("max_inflight_per_container"), hooks=hooks,
        auth=cfg.get("auth") or None, acl=cfg.get("acl"), events=cfg.get("events"),
        docker_host=cfg.get("docker_host"), probe_modules=modules, probes=probes,
        max_probes_inflight=limits.get("max_probes_inflight"),
        docker_healthchecks=cfg.get("docker_healthchecks"))
