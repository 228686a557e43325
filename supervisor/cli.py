"""The ``warmexec`` command: ``serve`` runs the supervisor; the rest are clients.

Client commands take ``--endpoint`` (or WARMEXEC_ENDPOINT). ``exec`` passes the
command's output through and exits with its exit code, as ``docker exec`` does: a
command that cannot be invoked (an unknown user, a working directory it cannot enter,
a spawn the container's limits refuse) exits 126 with the reason alone on stderr, as
docker's does; a missing executable is 127 (the command's own reply); every other
error is warmexec's own and exits 125 with its code and message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..protocol import errors
from ..protocol.client import DEFAULT_ENDPOINT, Client, default_endpoint, too_large
from ..protocol.codec import MAX_MESSAGE
from ..protocol.errors import BAD_REQUEST, WarmexecError
from . import cli_stream, cli_tty

OWN_ERROR = 125
CANNOT_INVOKE = 126
#: Errors that say the command could not be started as asked, not that warmexec failed.
INVOKE_ERRORS = frozenset((errors.NO_SUCH_USER, errors.BAD_CWD, errors.PERMISSION, errors.SPAWN_FAILED))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except WarmexecError as exc:
        if exc.code in INVOKE_ERRORS:
            print(exc.message, file=sys.stderr)
            return CANNOT_INVOKE
        print(f"warmexec: {exc.code}: {exc.message}", file=sys.stderr)
        return OWN_ERROR
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmexec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()

    s = sub.add_parser("serve", help="run the supervisor (root)")
    s.add_argument("--runc-root", action="append", dest="roots", metavar="DIR",
                   help="runc-format state root to watch (repeatable; globs allowed); "
                        "default: /run/runc, /run/containerd/runc/*, /run/docker/runtime-runc/*")
    s.add_argument("--endpoint", default=None, help=f"ZeroMQ endpoint to bind (default {DEFAULT_ENDPOINT})")
    s.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus metrics here")
    s.add_argument("--config", metavar="FILE", help="TOML config (hooks, limits)")
    s.add_argument("--no-container-label", action="store_true",
                   help="drop the container label from metrics (hosts with thousands of containers)")
    s.add_argument("--scan-interval", type=float, default=None,
                   help="seconds between full rescans of the state roots (default 2; inotify "
                        "sees changes at once)")
    s.add_argument("--events", metavar="ENDPOINT",
                   help="publish the event stream here (e.g. ipc:///run/warmexec/events.sock)")
    s.add_argument("--docker-host", metavar="URL", default=None,
                   help="the Docker engine whose container names to serve (default "
                        "unix:///var/run/docker.sock; '' for none)")
    s.add_argument("--insecure-tcp", action="store_true",
                   help="serve a tcp:// endpoint without CurveZMQ authentication")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one object per line, event fields as keys")
    s.set_defaults(func=cmd_serve)

    cri = sub.add_parser("cri", help="a CRI endpoint: ExecSync from warm workers, the rest forwarded")
    cri.add_argument("--listen", required=True, metavar="URL", help="e.g. unix:///run/warmexec/cri.sock")
    cri.add_argument("--upstream", required=True, metavar="URL",
                     help="the runtime's CRI socket, e.g. unix:///run/containerd/containerd.sock")
    cri.add_argument("--endpoint", default=None, help="the supervisor (default $WARMEXEC_ENDPOINT or "
                                                      f"{DEFAULT_ENDPOINT})")
    cri.add_argument("--upstream-kind", choices=("containerd", "cri-o"), default=None,
                     help="whose ExecSync answers to give (default: from the runtime's Version reply)")
    cri.add_argument("--metrics-addr", default=None, metavar="HOST:PORT",
                     help="serve the proxy's own Prometheus metrics there (default: none)")
    cri.add_argument("--log-level", default="INFO")
    cri.set_defaults(func=cmd_cri)

    k = sub.add_parser("keygen", help="make a CurveZMQ key pair (NAME.key, NAME.key_secret)")
    k.add_argument("directory")
    k.add_argument("name")
    k.set_defaults(func=cmd_keygen)

    e = sub.add_parser("exec", help="run a command in a container")
    _endpoint(e)
    e.add_argument("-u", "--user", help="USER[:GROUP], names or numbers, resolved in the container")
    e.add_argument("-w", "--workdir", help="working directory inside the container")
    e.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    e.add_argument("--timeout", type=float, help="kill the command's process group after S seconds")
    e.add_argument("--privileged", action="store_true", help="all capabilities")
    e.add_argument("-i", "--interactive", action="store_true", help="send our stdin to the command")
    e.add_argument("-t", "--tty", action="store_true", help="a terminal in the container (-it: a shell)")
    e.add_argument("--detach-keys", metavar="KEYS",
                   help=f"-it: the keys that leave the exec running (default {cli_tty.DEFAULT_DETACH_KEYS})")
    e.add_argument("-d", "--detach", action="store_true", help="print the exec id and pid, leave it running")
    e.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="KEY=VALUE lines, as docker's (before -e)")
    e.add_argument("--stream", action="store_true", help="stream output (default when it is a terminal, "
                                                         "or with -i or -d)")
    e.add_argument("--no-stream", action="store_true", help="one request, output at exit (-i: at most 4 MiB)")
    e.add_argument("--capture", type=int, help="bytes of stdout/stderr to keep (default 64 KiB each)")
    e.add_argument("container")
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_exec)

    ls = sub.add_parser("ls", help="list active containers and their workers")
    _endpoint(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    pr = sub.add_parser("probes", help="the scheduled probes ([[probes]]) and their containers' health")
    _endpoint(pr)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_probes)

    a = sub.add_parser("attach", help="make any process's namespaces an exec target")
    _endpoint(a)
    a.add_argument("name")
    a.add_argument("--pid", type=int, required=True)
    a.set_defaults(func=lambda args: _simple(args, "attach", args.name, args.pid))

    d = sub.add_parser("detach", help="forget an attached process")
    _endpoint(d)
    d.add_argument("name")
    d.set_defaults(func=lambda args: _simple(args, "detach", args.name))

    ev = sub.add_parser("events", help="print the supervisor's event stream as JSON lines")
    ev.add_argument("--endpoint", required=True, help="the supervisor's --events endpoint")
    ev.add_argument("--topic", action="append", default=[], metavar="PREFIX",
                    help="only topics starting with PREFIX (repeatable; default all)")
    ev.add_argument("--count", type=int, default=0, help="exit after this many events")
    ev.set_defaults(func=cmd_events)

    cli_stream.add_commands(sub, _endpoint)

    pg = sub.add_parser("ping", help="check that the supervisor answers")
    _endpoint(pg)
    pg.set_defaults(func=lambda args: _simple(args, "ping"))
    return p


def _endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=None, help="supervisor endpoint (default $WARMEXEC_ENDPOINT "
                                                    f"or {DEFAULT_ENDPOINT})")
    p.add_argument("--server-key", default=os.environ.get("WARMEXEC_SERVER_KEY"), metavar="FILE",
                   help="the server's public key file, for a CurveZMQ endpoint ($WARMEXEC_SERVER_KEY)")
    p.add_argument("--client-key", default=os.environ.get("WARMEXEC_CLIENT_KEY"), metavar="FILE",
                   help="our key_secret file, for a CurveZMQ endpoint ($WARMEXEC_CLIENT_KEY)")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.endpoint, server_key=args.server_key, client_key=args.client_key)


def cmd_keygen(args: argparse.Namespace) -> int:
    import zmq.auth  # noqa: PLC0415 - only this command needs it

    os.makedirs(args.directory, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.directory, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise WarmexecError("BAD_REQUEST", "no command given")
    env = {}
    for path in args.env_file:
        env.update(cli_stream.parse_env_file(path))
    for item in args.env:
        key, sep, value = item.partition("=")
        env[key] = value if sep else os.environ.get(key, "")
    if cli_stream.wants_stream(args):
        with _client(args) as c:
            return cli_stream.run_streamed(c, args, command, env)
    stdin = read_stdin() if args.interactive else None
    with _client(args) as c:
        r = c.exec(args.container, command, env=env or None, cwd=args.workdir, user=args.user,
                   timeout=args.timeout, stdin=stdin, capture=args.capture,
                   privileged=args.privileged or None)
    sys.stdout.buffer.write(r["stdout"])
    sys.stdout.flush()
    sys.stderr.buffer.write(r["stderr"])
    if r.get("timed_out"):
        print(f"warmexec: timed out after {args.timeout}s", file=sys.stderr)
    return r["exit_code"]


def read_stdin() -> bytes:
    """Our stdin, for -i: no more than a request can carry, plus one byte to know it is
    more (a request is one frame of at most 4 MiB, and stdin may be endless)."""
    data = sys.stdin.buffer.read(MAX_MESSAGE + 1)
    if len(data) > MAX_MESSAGE:
        raise WarmexecError(BAD_REQUEST, too_large(f"more than {MAX_MESSAGE}"))
    return data


def cmd_events(args: argparse.Namespace) -> int:
    import zmq  # noqa: PLC0415 - the other client commands go through Client

    from ..protocol import codec  # noqa: PLC0415

    sock = zmq.Context.instance().socket(zmq.SUB)
    for prefix in args.topic or [""]:
        sock.setsockopt_string(zmq.SUBSCRIBE, prefix)
    sock.connect(args.endpoint)
    seen = 0
    try:
        while not args.count or seen < args.count:
            _, payload = sock.recv_multipart()
            print(json.dumps(codec.unpack(payload), default=repr), flush=True)
            seen += 1
    finally:
        sock.close(linger=0)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.list()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fmt = "{:<12}  {:<24} {:<14} {:<20} {:<28} {:<9} {:>8} {:>8}"
    print(fmt.format("CONTAINER ID", "NAME", "ENGINE", "IMAGE", "POD", "WORKER", "INFLIGHT", "RESTARTS"))
    for r in rows:
        kind = f"{r['engine']}:{r['containerd_namespace']}" if r.get("containerd_namespace") else r["engine"]
        pod = f"{r['namespace']}/{r['pod']}" if r.get("pod") else "-"
        short = r["id"][:12] if len(r["id"]) == 64 else r["id"]  # docker's short form of its ids
        print(fmt.format(short, r.get("name") or "-", kind, r.get("image") or "-", pod, r["state"],
                         r["inflight"], r["restarts"]))
    return 0


def cmd_probes(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.call("probes")["probes"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(probe_table(rows, time.time()), end="")
    return 0


def probe_table(rows: list[dict], now: float) -> str:
    """Unhealthy first, then unknown, then healthy; each a line people read at a glance."""
    fmt = "{:<16} {:<24} {:<10} {:<26} {:>5} {:>9} {:>6} {:>6} {:>8} {:>6}\n"
    out = [fmt.format("PROBE", "CONTAINER", "STATUS", "LAST RESULT", "EXIT", "DURATION", "STREAK", "RUNS",
                      "SINCE", "NEXT")]
    order = {"unhealthy": 0, "unknown": 1, "healthy": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["status"], 1), r["probe"], r["name"] or r["container"])):
        last = r.get("last") or {}
        result = last.get("result", "-")
        if last.get("error"):
            result = f"error {last['error']['code']}"
        exit_code = last.get("exit_code")
        duration = f"{last['duration'] * 1000:.1f}ms" if "duration" in last else "-"
        since = _ago(now - r["changed_at"]) if r.get("changed_at") else "-"
        out.append(fmt.format(r["probe"][:16], (r.get("name") or r["container"])[:24], r["status"],
                              result[:26] + ("*" if r.get("running") else ""),
                              "-" if exit_code is None else exit_code, duration, r["streak"], r["runs"],
                              since, _ago(r["next_in"])))
    return "".join(out)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _simple(args: argparse.Namespace, op: str, name: str | None = None, pid: int | None = None) -> int:
    with _client(args) as c:
        r = c.call(op, container=name, pid=pid)
    if op == "ping":
        print(f"supervisor pid {r['pid']} answering at {args.endpoint or default_endpoint()}")
    return 0


def cmd_cri(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - only this command needs it

    from .cri import serve  # noqa: PLC0415 - grpc is imported by this command alone
    from .logs import configure  # noqa: PLC0415

    configure(args.log_level, "text")
    try:
        asyncio.run(serve(args.listen, args.upstream, args.endpoint, args.upstream_kind, args.metrics_addr))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .logs import configure  # noqa: PLC0415
    from .run import serve

    configure(args.log_level, args.log_format)
    return serve(args, load_config(args.config))


if __name__ == "__main__":
    sys.exit(main())
