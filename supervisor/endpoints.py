"""Binding ZeroMQ endpoints: an ipc:// socket file is made root-only."""

from __future__ import annotations

import os
import socket

import zmq


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; an ipc:// endpoint gets a root-only directory (0700) and socket (0600)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise SystemExit(f"warmexec: {endpoint} is in use by a running supervisor")
            except OSError:
                os.unlink(path)  # stale socket of a dead supervisor
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)
        return endpoint
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
