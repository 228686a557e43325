"""Wiring for ``warmexec serve``: flags and config into one running Supervisor."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..protocol.client import DEFAULT_ENDPOINT
from . import discovery
from .server import Supervisor

log = logging.getLogger("warmexec")


def serve(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    limits = cfg.get("limits", {})
    sup = Supervisor(
        endpoint=args.endpoint or cfg.get("endpoint") or DEFAULT_ENDPOINT,
        roots=args.roots or cfg.get("runc_roots") or list(discovery.DEFAULT_ROOTS),
        scan_interval=args.scan_interval or cfg.get("scan_interval", 1.0),
        max_inflight=limits.get("max_inflight", 1024),
        max_inflight_per_container=limits.get("max_inflight_per_container", 256),
    )
    log.info("warmexec serving on %s", sup.endpoint)
    sup.serve_forever()
    return 0
