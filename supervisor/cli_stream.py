"""``warmexec exec`` streamed, and the commands about running execs (``inspect``, ``kill``).

``exec`` streams (protocol/streams.py) when its output is a terminal, or with ``-i``,
``-d``, ``-t`` or ``--stream``: output is printed as it comes, stdin (``-i``) is sent as
it is read, with no size limit. ``--no-stream`` keeps the one-shot request. ``-d``
prints the exec id and its pid and leaves it running. ``-t`` is cli_tty.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from ..protocol.client import Client
from ..protocol.errors import BAD_REQUEST, WarmexecError
from . import cli_tty


def parse_env_file(path: str) -> dict[str, str]:
    """docker's --env-file: KEY=VALUE lines; KEY alone takes our own value (if set);
    blank lines and lines starting with # are skipped; a name with whitespace is an error."""
    env: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WarmexecError(BAD_REQUEST, f"--env-file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise WarmexecError(BAD_REQUEST, f"--env-file {path}:{number}: variable {key!r} contains "
                                             "whitespaces or is empty")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def wants_stream(args: argparse.Namespace) -> bool:
    if args.no_stream:
        return False
    return bool(args.stream or args.detach or args.interactive or args.tty or sys.stdout.isatty())


def run_streamed(c: Client, args: argparse.Namespace, command: list[str], env: dict[str, str]) -> int:
    if args.tty:
        return cli_tty.run_tty(c, args, command, env)
    s = c.stream(args.container, command, env=env or None, cwd=args.workdir, user=args.user,
                 timeout=args.timeout, privileged=args.privileged or None,
                 interactive=args.interactive, detach=args.detach)
    if args.detach:
        for _ in s.events():
            pass
        print(f"{s.exec_id} {s.pid}")
        return 0
    result = s.run(sys.stdin.fileno() if args.interactive else None, sys.stdout.buffer, sys.stderr.buffer)
    if result.get("timed_out"):
        print(f"warmexec: timed out after {args.timeout}s", file=sys.stderr)
    return result["exit_code"]


def add_commands(sub: argparse._SubParsersAction,
                 endpoint: Callable[[argparse.ArgumentParser], None]) -> None:
    i = sub.add_parser("inspect", help="a streamed or detached exec: running or exited, its exit code")
    endpoint(i)
    i.add_argument("exec_id", type=int)
    i.set_defaults(func=cmd_inspect)

    k = sub.add_parser("kill", help="signal a streamed or detached exec")
    endpoint(k)
    k.add_argument("-s", "--signal", default="KILL", help="name or number (default KILL)")
    k.add_argument("--group", action="store_true", help="its whole process group")
    k.add_argument("exec_id", type=int)
    k.set_defaults(func=cmd_kill)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.endpoint, server_key=args.server_key, client_key=args.client_key)


def cmd_inspect(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.inspect(args.exec_id)
    print(json.dumps({k: v for k, v in r.items() if k not in ("v", "id", "ok")}, indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    sig: int | str = int(args.signal) if args.signal.isdigit() else args.signal
    with _client(args) as c:
        c.kill(args.exec_id, sig, args.group)
    return 0
