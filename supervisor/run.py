"""Wiring for ``warmexec serve``: flags over the config file, into one running Supervisor."""

from __future__ import annotations

import argparse
import logging
import resource

from .config import Config
from .exporter import Exporter, Loopback
from .httpserver import start_http_server
from .metrics import Metrics
from .server import Supervisor

log = logging.getLogger("warmexec")


def raise_fd_limit() -> None:
    """A few fds per warm container: take the hard limit, as daemons do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(args: argparse.Namespace, cfg: Config) -> int:
    raise_fd_limit()
    cfg = cfg.with_flags(endpoint=args.endpoint, runc_roots=tuple(args.roots) if args.roots else None,
                         metrics_addr=args.metrics_addr, scan_interval=args.scan_interval,
                         events=args.events, insecure_tcp=args.insecure_tcp or None,
                         docker_host=args.docker_host,
                         container_label=False if args.no_container_label else None)
    metrics = Metrics(container_label=cfg.container_label)
    sup = Supervisor(cfg, metrics)
    if cfg.metrics_addr:
        host, _, port = cfg.metrics_addr.rpartition(":")
        exporter = Exporter(Loopback(sup.ctx, sup.loopback_endpoint), cfg.probe_modules)
        http = start_http_server(int(port), host or "127.0.0.1", registry=metrics.registry,
                                 routes=exporter.routes(), on_close=exporter.close)
        sup.on_close.append(http.close)  # its loopback socket must close before the context ends
        log.info("metrics on http://%s/metrics, probes on /probe, discovery on /sd", cfg.metrics_addr)
    log.info("warmexec serving on %s", sup.endpoint)
    sup.serve_forever()
    return 0
