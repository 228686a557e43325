"""``warmexec serve --config FILE``: a TOML file; command-line flags win over it.

    endpoint = "ipc:///run/warmexec/warmexec.sock"
    runc_roots = ["/run/runc"]
    metrics_addr = "127.0.0.1:9750"
    container_label = true

    [limits]
    max_inflight = 1024
    max_inflight_per_container = 256

    [[hooks.start]]              # once the exec's pid is known
    command = ["/usr/local/bin/audit-exec"]
    timeout = 5                  # seconds; the hook is killed after it

    [[hooks.exit]]               # once its wait status is known
    command = ["logger", "-t", "warmexec"]
"""

from __future__ import annotations

import tomllib
from typing import Any


class ConfigError(SystemExit):
    pass


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"warmexec: cannot read config {path}: {exc}") from None
    for kind in ("start", "exit"):
        for hook in cfg.get("hooks", {}).get(kind, []):
            cmd = hook.get("command")
            if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
                raise ConfigError(f"warmexec: {path}: hooks.{kind}.command must be a list of strings")
            if not isinstance(hook.get("timeout", 5), (int, float)):
                raise ConfigError(f"warmexec: {path}: hooks.{kind}.timeout must be a number")
    return cfg
