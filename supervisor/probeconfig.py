"""Probe modules and scheduled probes: ``[probe_modules.NAME]`` and ``[[probes]]``.

Modules are the commands ``/probe`` may run (exporter.py)::

::

    [probe_modules.alive]
    argv = ["cat", "/tmp/healthy"]
    timeout = 2            # seconds; a scrape's own timeout may cut it shorter
    user = "nobody"        # optional: the container's own user otherwise
    exit_codes = [0]       # exit codes that count as success
    regex = "^ok"          # optional: stdout must match (re.search, multiline)
    capture = 4096         # bytes of stdout and of stderr kept (the regex sees these)

A module is trusted configuration (only root writes the config file); what a scrape
chooses is which module and which container, never the command.

Scheduled probes (scheduler.py) run a module, or a command of their own, in every
container they select, with Kubernetes' semantics and defaults::

    [[probes]]
    name = "web-alive"
    module = "alive"             # or argv = [...] (and exit_codes, regex, user, capture)
    containers = ["web-*"]       # globs on ids, names and aliases (default: every one)
    annotations = { "io.kubernetes.container.name" = "nginx" }  # each must match
    initial_delay = 0            # seconds after the container is first seen
    period = 10
    timeout = 1
    success_threshold = 1        # consecutive successes to become healthy
    failure_threshold = 3        # consecutive failures to become unhealthy
    hook = ["/usr/local/bin/on-probe-change"]   # optional: the probe's JSON on stdin
    hook_timeout = 5

Parsing is pure: it raises ValueError, which config.py words with the file's name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.messages import MAX_CAPTURE, MAX_TIMEOUT

if TYPE_CHECKING:
    from .names import DockerHealth

DEFAULT_TIMEOUT = 5.0
DEFAULT_CAPTURE = 4096
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # what a module may be called (it is in URLs)
MODULE_KEYS = frozenset(("argv", "timeout", "user", "exit_codes", "regex", "capture"))


@dataclass(frozen=True)
class ProbeModule:
    name: str
    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    user: str | None = None
    exit_codes: frozenset[int] = frozenset((0,))
    regex: re.Pattern[bytes] | None = None
    capture: int = DEFAULT_CAPTURE


def parse_modules(table: Any) -> dict[str, ProbeModule]:
    """Every ``[probe_modules.NAME]``; ValueError names the first bad one."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ValueError("probe_modules must be a table of tables")
    return {name: parse_module(name, body) for name, body in table.items()}


def parse_module(name: str, body: Any) -> ProbeModule:
    where = f"probe_modules.{name}"
    if not NAME.fullmatch(name):
        raise ValueError(f"{where}: a module name is 1-64 of A-Z a-z 0-9 _ . -")
    if not isinstance(body, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(body) - MODULE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(MODULE_KEYS))})")
    return ProbeModule(name=name, argv=argv_of(body.get("argv"), f"{where}.argv"),
                       timeout=seconds(body.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout"),
                       user=_user(body.get("user"), where),
                       exit_codes=_exit_codes(body.get("exit_codes", [0]), where),
                       regex=_regex(body.get("regex"), where),
                       capture=_capture(body.get("capture", DEFAULT_CAPTURE), where))


def argv_of(value: Any, where: str) -> tuple[str, ...]:
    strings = isinstance(value, list) and all(isinstance(a, str) and "\0" not in a for a in value)
    if not strings or not value or not value[0]:
        raise ValueError(f"{where} must be a non-empty list of strings")
    return tuple(value)


def seconds(value: Any, where: str, *, zero: bool = False) -> float:
    """A positive number of seconds (zero too if allowed), at most MAX_TIMEOUT."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number of seconds")
    if not (0 <= value if zero else 0 < value) or value > MAX_TIMEOUT:
        raise ValueError(f"{where} must be in {'[' if zero else '('}0, {MAX_TIMEOUT:.0f}] seconds")
    return float(value)


def _user(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{where}.user must be a non-empty string")
    return value


def _exit_codes(value: Any, where: str) -> frozenset[int]:
    if (not isinstance(value, list) or not value
            or not all(type(c) is int and 0 <= c <= 255 for c in value)):
        raise ValueError(f"{where}.exit_codes must be a non-empty list of integers 0-255")
    return frozenset(value)


def _regex(value: Any, where: str) -> re.Pattern[bytes] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}.regex must be a string")
    try:
        return re.compile(value.encode(), re.MULTILINE)
    except re.error as exc:
        raise ValueError(f"{where}.regex: {exc}") from None


def _capture(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_CAPTURE:
        raise ValueError(f"{where}.capture must be an integer in [0, {MAX_CAPTURE}]")
    return value


def succeeded(module: ProbeModule, reply: dict) -> bool:
    """An exec reply (ok) as the module judges it: an accepted exit code, not killed at
    its timeout, and the regex (if any) found in the stdout kept."""
    if reply.get("timed_out") or reply.get("exit_code") not in module.exit_codes:
        return False
    return module.regex is None or module.regex.search(reply.get("stdout") or b"") is not None


# ---- scheduled probes: [[probes]] ------------------------------------------------------

PROBE_KEYS = frozenset(("name", "module", "containers", "annotations", "initial_delay", "period", "timeout",
                        "success_threshold", "failure_threshold", "hook", "hook_timeout")) | MODULE_KEYS
INLINE_ONLY = MODULE_KEYS - {"timeout"}  # given with module = "...", these would be ignored: refused


@dataclass(frozen=True)
class ProbeSpec:
    """One ``[[probes]]`` entry: what to run, where, and when (Kubernetes' defaults)."""

    name: str
    module: ProbeModule  # the command and how its outcome is judged; its timeout is the probe's
    containers: tuple[str, ...] = ("*",)  # globs on a container's id, name and aliases
    annotations: tuple[tuple[str, str], ...] = ()  # (key, glob): each must match the spec's
    initial_delay: float = 0.0
    period: float = 10.0
    success_threshold: int = 1
    failure_threshold: int = 3
    hook: tuple[str, ...] = ()  # run on each change of health, the probe's JSON on stdin
    hook_timeout: float = 5.0
    start_period: float = 0.0  # failures this long after the container was first seen do not count

    @property
    def timeout(self) -> float:
        return self.module.timeout


def parse_probes(value: Any, modules: dict[str, ProbeModule]) -> tuple[ProbeSpec, ...]:
    """Every ``[[probes]]``; ValueError names the first bad one."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("probes must be an array of tables ([[probes]])")
    specs = tuple(parse_probe(i, body, modules) for i, body in enumerate(value))
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"two probes are named {dup!r}")
    return specs


def parse_probe(index: int, body: Any, modules: dict[str, ProbeModule]) -> ProbeSpec:
    where = f"probes[{index}]"
    if not isinstance(body, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(body) - PROBE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}.name must be 1-64 of A-Z a-z 0-9 _ . -")
    where = f"probes.{name}"
    timeout = seconds(body.get("timeout", 1.0), f"{where}.timeout")  # Kubernetes' default: 1 s
    if ("module" in body) == ("argv" in body):
        raise ValueError(f"{where}: give either module = \"NAME\" or argv = [...]")
    if "module" in body:
        base = modules.get(body["module"]) if isinstance(body["module"], str) else None
        if base is None:
            raise ValueError(f"{where}.module: no [probe_modules.{str(body['module'])[:64]}]")
        if set(body) & INLINE_ONLY:
            raise ValueError(f"{where}: {sorted(set(body) & INLINE_ONLY)[0]} belongs to the module")
        module = dataclasses.replace(base, timeout=timeout)
    else:
        module = parse_module(name, {k: body[k] for k in MODULE_KEYS if k in body} | {"timeout": timeout})
    return ProbeSpec(name=name, module=module, containers=_globs(body.get("containers", ["*"]), where),
                     annotations=_annotations(body.get("annotations", {}), where),
                     initial_delay=seconds(body.get("initial_delay", 0), f"{where}.initial_delay", zero=True),
                     period=seconds(body.get("period", 10.0), f"{where}.period"),
                     success_threshold=_count(body.get("success_threshold", 1), f"{where}.success_threshold"),
                     failure_threshold=_count(body.get("failure_threshold", 3), f"{where}.failure_threshold"),
                     hook=argv_of(body["hook"], where + ".hook") if "hook" in body else (),
                     hook_timeout=seconds(body.get("hook_timeout", 5.0), f"{where}.hook_timeout"))


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(g, str) and g for g in value):
        raise ValueError(f"{where}.containers must be a non-empty list of globs")
    return tuple(value)


def _annotations(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{where}.annotations must be a table of KEY = \"GLOB\"")
    return tuple(sorted(value.items()))


def _count(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= 1000:
        raise ValueError(f"{where} must be an integer in [1, 1000]")
    return value


# ---- Docker's HEALTHCHECK as a scheduled probe ---------------------------------------------

DOCKER_PROBE = "docker"  # the probe's name: its metrics' probe label
DOCKER_DEFAULTS = {"interval": 30.0, "timeout": 30.0, "retries": 3}  # docker's own
DOCKER_OUTPUT = 4096  # bytes of output docker keeps of a check


def docker_spec(health: DockerHealth) -> ProbeSpec:
    """A container's HEALTHCHECK with docker's semantics: ``CMD`` runs its arguments,
    ``CMD-SHELL`` its string in the container's shell (``/bin/sh -c`` unless the image
    sets SHELL); exit 0 is healthy, anything else (1, by docker's convention) a failure,
    as is a timeout; ``retries`` failures in a row make it unhealthy, one success healthy;
    failures in the start period do not count. Durations of 0 are docker's defaults."""
    if health.test[0] == "CMD-SHELL":
        argv = (*(health.shell or ("/bin/sh", "-c")), health.test[1])
    else:
        argv = health.test[1:]
    ns = 1e-9
    timeout = min(health.timeout * ns or DOCKER_DEFAULTS["timeout"], MAX_TIMEOUT)
    module = ProbeModule(name=DOCKER_PROBE, argv=tuple(argv), timeout=timeout, capture=DOCKER_OUTPUT)
    return ProbeSpec(name=DOCKER_PROBE, module=module,
                     period=min(health.interval * ns or DOCKER_DEFAULTS["interval"], MAX_TIMEOUT),
                     success_threshold=1, failure_threshold=health.retries or DOCKER_DEFAULTS["retries"],
                     start_period=min(health.start_period * ns, MAX_TIMEOUT))
