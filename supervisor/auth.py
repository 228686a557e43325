"""Who may exec: CurveZMQ authentication for TCP endpoints, and per-key access lists.

The default endpoint is a unix socket only root can reach, and needs nothing more. A TCP
endpoint is served only with CurveZMQ (unless ``--insecure-tcp`` says otherwise): the
server's key pair and a directory of authorised client public keys, in the certificate
files pyzmq's ``zmq.auth`` writes (``warmexec keygen`` makes them). ZAP authentication
runs on pyzmq's authenticator thread; every message then carries its sender's key as
``User-Id``, and the access list of that key decides:

    [auth]
    server_key = "/etc/warmexec/server.key_secret"
    clients_dir = "/etc/warmexec/clients"      # NAME.key: the client's public key

    [acl.monitor]                              # the key in clients_dir/monitor.key
    containers = ["web-*", "db1"]              # ids or glob patterns
    users = [""]                               # "" the container's own user; "*" any
    privileged = false
    admin = false                              # attach / detach

An authorised key without an ``[acl.NAME]`` section may do everything. Denials are
``FORBIDDEN`` errors, counted like every other error.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..protocol.errors import FORBIDDEN, WarmexecError
from ..protocol.messages import ExecRequest


class AuthConfigError(SystemExit):
    pass


@dataclass
class Rules:
    containers: list[str] = field(default_factory=lambda: ["*"])
    users: list[str] = field(default_factory=lambda: ["*"])
    privileged: bool = True
    admin: bool = True

    def may_see(self, container: str) -> bool:
        return "*" in self.containers or any(fnmatch.fnmatchcase(container, p)
                                             for p in self.containers)

    def check_exec(self, req: ExecRequest) -> None:
        """May this key start req? Also asked of every request about a running or
        finished streamed exec (attach, stdin, signal, inspect): what a key could not
        have started, it may neither drive nor see."""
        if not self.may_see(req.container):
            raise WarmexecError(FORBIDDEN, f"not allowed to exec into {req.container}")
        if req.privileged and not self.privileged:
            raise WarmexecError(FORBIDDEN, "not allowed to exec privileged")
        user = req.user or ""
        if "*" not in self.users and user not in self.users:
            raise WarmexecError(FORBIDDEN, f"not allowed to exec as user {user or '(default)'}")

    def check_admin(self, op: str) -> None:
        if not self.admin:
            raise WarmexecError(FORBIDDEN, f"not allowed to {op}")


EVERYTHING = Rules()


class Auth:
    """CurveZMQ on a socket, and the access rules of each authenticated key."""

    def __init__(self, cfg: dict[str, Any], acl: dict[str, dict]) -> None:
        try:
            self.public, self.secret = zmq.auth.load_certificate(cfg["server_key"])
        except (KeyError, OSError, ValueError) as exc:
            raise AuthConfigError(f"warmexec: [auth] server_key: {exc}") from None
        self.clients_dir = cfg.get("clients_dir", "")
        if not self.secret or not os.path.isdir(self.clients_dir):
            raise AuthConfigError("warmexec: [auth] needs a secret server_key and a clients_dir")
        self.rules: dict[str, Rules] = {}
        for name, rule in acl.items():
            path = os.path.join(self.clients_dir, f"{name}.key")
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                raise AuthConfigError(f"warmexec: [acl.{name}]: {path}: {exc}") from None
            self.rules[public.decode()] = Rules(
                containers=list(rule.get("containers", ["*"])), users=list(rule.get("users", ["*"])),
                privileged=bool(rule.get("privileged", True)), admin=bool(rule.get("admin", True)))
        self.authenticator: ThreadAuthenticator | None = None

    def secure(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Start ZAP and make sock a CURVE server (before it binds)."""
        self.authenticator = ThreadAuthenticator(ctx)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=self.clients_dir)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def rules_for(self, user_id: str | None) -> Rules:
        return self.rules.get(user_id or "", EVERYTHING)

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
