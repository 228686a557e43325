"""Wiring for ``warmexec serve``: flags and config into one running Supervisor."""

from __future__ import annotations

import argparse
import logging
import resource
from typing import Any

from ..protocol.client import DEFAULT_ENDPOINT
from . import discovery
from .auth import Auth
from .hooks import load_python_hooks
from .metrics import Metrics, start_http_server
from .server import Supervisor

log = logging.getLogger("warmexec")


def raise_fd_limit() -> None:
    """A few fds per warm container: take the hard limit, as daemons do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    raise_fd_limit()
    limits = cfg.get("limits", {})
    auth = Auth(cfg["auth"], cfg.get("acl", {})) if cfg.get("auth") else None
    metrics = Metrics(container_label=not args.no_container_label and cfg.get("container_label", True))
    hooks = cfg.get("hooks", {})
    sup = Supervisor(
        endpoint=args.endpoint or cfg.get("endpoint") or DEFAULT_ENDPOINT,
        roots=args.roots or cfg.get("runc_roots") or list(discovery.DEFAULT_ROOTS),
        metrics=metrics,
        hooks=hooks,
        python_hooks=load_python_hooks(hooks.get("python", [])),
        scan_interval=args.scan_interval or cfg.get("scan_interval", 2.0),
        max_inflight=limits.get("max_inflight", 1024),
        max_inflight_per_container=limits.get("max_inflight_per_container", 256),
        auth=auth,
        insecure_tcp=args.insecure_tcp,
        events=args.events or cfg.get("events"),
    )
    addr = args.metrics_addr or cfg.get("metrics_addr")
    if addr:
        host, _, port = addr.rpartition(":")
        start_http_server(int(port), host or "127.0.0.1", registry=metrics.registry)
        log.info("metrics on http://%s/metrics", addr)
    log.info("warmexec serving on %s", sup.endpoint)
    sup.serve_forever()
    return 0
