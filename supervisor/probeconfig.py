"""Probe modules: the commands ``/probe`` may run, from ``[probe_modules.NAME]`` tables.

::

    [probe_modules.alive]
    argv = ["cat", "/tmp/healthy"]
    timeout = 2            # seconds; a scrape's own timeout may cut it shorter
    user = "nobody"        # optional: the container's own user otherwise
    exit_codes = [0]       # exit codes that count as success
    regex = "^ok"          # optional: stdout must match (re.search, multiline)
    capture = 4096         # bytes of stdout and of stderr kept (the regex sees these)

A module is trusted configuration (only root writes the config file); what a scrape
chooses is which module and which container, never the command. Parsing is pure: it
raises ValueError, which config.py words with the file's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..protocol.messages import MAX_CAPTURE, MAX_TIMEOUT

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
    return ProbeModule(name=name, argv=argv_of(body.get("argv"), where),
                       timeout=seconds(body.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout"),
                       user=_user(body.get("user"), where),
                       exit_codes=_exit_codes(body.get("exit_codes", [0]), where),
                       regex=_regex(body.get("regex"), where),
                       capture=_capture(body.get("capture", DEFAULT_CAPTURE), where))


def argv_of(value: Any, where: str) -> tuple[str, ...]:
    strings = isinstance(value, list) and all(isinstance(a, str) and "\0" not in a for a in value)
    if not strings or not value or not value[0]:
        raise ValueError(f"{where}.argv must be a non-empty list of strings")
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
