"""Hostile input on the wire: whatever a client sends, the supervisor answers each
message exactly once with a well-formed reply, keeps serving everyone else, and does
not grow.

Everything goes as raw ZeroMQ frames to the session supervisor (real containers, real
workers): random bytes, byte-level mutations of a valid frame, random msgpack values,
and valid exec requests with one to three fields made wrong (wrong types, NUL bytes,
absurd sizes and timeouts, unknown users, containers and ops). Each hypothesis example
is one batch of frames sent on a fresh DEALER; replies are matched to frames by count
and by the echoed ``id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import string
import time

import msgpack
import psutil
import pytest
import zmq
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmexec.protocol import Client, codec, errors, messages
from warmexec.protocol.errors import WarmexecError

from .conftest import CurveSupervisor, Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root

MIB = 1 << 20
RSS_SLACK = 5 * MIB
FD_SLACK = 5
REPLY_WAIT = 15.0  # per batch; valid execs here are `true`, answered in milliseconds

# Users a mutated-but-valid exec may run as. Their workers (one per credential profile)
# are made before the baseline is taken, so one appearing is not counted as growth. Every other user
# the strategies produce is a name in neither /etc/passwd nor /etc/group.
KNOWN_USERS = (None, "root", "alice")


# ------------------------------------------------------------------------- the harness

class Fuzz:
    """Sends batches of frames on short-lived DEALERs and checks every reply."""

    def __init__(self, endpoint: str, pid: int, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve  # (server public, our public, our secret) for a CurveZMQ endpoint
        self.proc = psutil.Process(pid)
        self.ctx = zmq.Context()
        self.frames = 0
        self.messages = 0
        self.batches = 0
        self.ok_replies = 0
        self.codes: dict[str, int] = {}
        self.wire_seconds = 0.0  # spent sending and waiting for replies (the rest is hypothesis)

    def close(self) -> None:
        self.ctx.term()

    def send_batch(self, batch: list[bytes | list[bytes]]) -> None:
        """Send each message (one frame, or a list of frames: an envelope then the
        payload), then expect exactly one reply per message, with the echoed id."""
        t_start = time.monotonic()
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self.curve
        s.connect(self.endpoint)
        try:
            expected_ids = []
            for msg in batch:
                parts = msg if isinstance(msg, list) else [msg]
                s.send_multipart(parts)
                self.frames += len(parts)
                expected_ids.append(_expected_id(parts[-1]))
            replies = []
            deadline = time.monotonic() + REPLY_WAIT
            while len(replies) < len(batch):
                left = deadline - time.monotonic()
                assert left > 0 and s.poll(int(left * 1000)), (
                    f"{len(replies)} replies to {len(batch)} messages after {REPLY_WAIT}s: {batch!r:.2000}")
                replies.append(s.recv_multipart())
            # exactly one each: nothing more arrives after the last expected reply
            assert not s.poll(0), "more replies than messages"
        finally:
            s.close()
        self.wire_seconds += time.monotonic() - t_start
        self.batches += 1
        self.messages += len(batch)
        got_ids = []
        for parts in replies:
            reply = msgpack.unpackb(parts[-1], raw=False, strict_map_key=False)
            self.check_reply(reply)
            got_ids.append(codec.pack(reply.get("id")))
        assert sorted(got_ids) == sorted(expected_ids)

    def check_reply(self, reply: object) -> None:
        assert isinstance(reply, dict), reply
        assert reply.get("v") == messages.VERSION and isinstance(reply.get("ok"), bool), reply
        if reply["ok"]:
            self.ok_replies += 1
            return
        err = reply.get("error")
        assert isinstance(err, dict) and err.get("code") in errors.ALL, reply
        assert isinstance(err.get("message"), str), reply
        assert err["code"] != errors.INTERNAL, f"the supervisor hit a bug: {reply}"
        self.codes[err["code"]] = self.codes.get(err["code"], 0) + 1

    # ---- growth -----------------------------------------------------------------------
    def hooks_running(self) -> list[psutil.Process]:
        """The supervisor's children but its zygote: hook processes."""
        kids = []
        for p in self.proc.children():
            with contextlib.suppress(psutil.Error):
                if "warmexec.worker.zygote" not in p.cmdline():
                    kids.append(p)
        return kids

    def usage(self) -> tuple[int, int]:
        return self.proc.memory_info().rss, self.proc.num_fds()

    @contextlib.contextmanager
    def bounded(self, what: str):
        """The supervisor's RSS and fd count after the block stay within a small bound
        of those before it (fds: once zmq has closed the peers' connections and running
        hooks have exited)."""
        rss0, fds0 = self.usage()
        frames0, wire0 = self.frames, self.wire_seconds
        t0 = time.monotonic()
        yield
        wait_for(lambda: not self.hooks_running(), 15, "the hooks of the valid execs to exit")
        wait_for(lambda: self.usage()[1] <= fds0 + FD_SLACK, 10, "the supervisor's fds to settle")
        rss1, fds1 = self.usage()
        print(f"\n{what}: {self.frames - frames0} frames in {time.monotonic() - t0:.1f}s "
              f"({self.wire_seconds - wire0:.1f}s on the wire); "
              f"supervisor RSS {rss0 / MIB:.1f} -> {rss1 / MIB:.1f} MiB, fds {fds0} -> {fds1}; "
              f"totals: {self.batches} batches, {self.messages} messages, {self.ok_replies} ok, "
              f"errors {dict(sorted(self.codes.items()))}")
        assert rss1 <= rss0 + RSS_SLACK, f"{what}: supervisor RSS grew {(rss1 - rss0) / MIB:.1f} MiB"
        assert fds1 <= fds0 + FD_SLACK


def _expected_id(payload: bytes) -> bytes:
    """The id the reply must carry: the map's, or nil for a frame that is not a map."""
    try:
        req = codec.unpack_map(payload)
    except codec.ProtocolError:
        return codec.pack(None)
    return codec.pack(req.get("id"))


@pytest.fixture(scope="module")
def fuzz(supervisor, client, container):
    f = Fuzz(supervisor.endpoint, supervisor.proc.pid)
    # Make every worker a valid mutated exec may use, and let the supervisor take its
    # one-off allocations (first error replies, first unknown user), before any baseline.
    for user in KNOWN_USERS:
        for privileged in (False, True):
            assert client.exec(container, ["true"], user=user, privileged=privileged)["exit_code"] == 0
    # A reply over SMALL_REPLY goes zero-copy, and the first one starts pyzmq's garbage
    # collector thread (its own context: two epolls, five eventfds): baseline, not growth.
    assert len(client.exec(container, ["head", "-c", "65536", "/dev/zero"])["stdout"]) == 65536
    # The largest frames the strategies make, too: the allocator's working size is part
    # of the baseline, not growth.
    base = {"v": 1, "op": "exec", "container": container, "argv": ["true"]}
    for _ in range(3):
        f.send_batch([b"", b"\xc1", codec.pack([1]), codec.pack({"v": 1, "op": "nope"}),
                      codec.pack({**base, "user": "nosuchuser"}),
                      codec.pack({**base, "stdin": b"x" * (messages.MAX_STDIN + 1)}),
                      codec.pack({**base, "argv": ["true"] * (messages.MAX_ARGS + 1)}),
                      codec.pack({**base, "env": {f"K{i}": "v" for i in range(messages.MAX_ENV + 1)}}),
                      codec.pack({**base, "argv": ["echo", "a" * (messages.MAX_STR + 1)]}),
                      codec.pack({**base, "id": os.urandom(2000), "capture": 0})])
    yield f
    f.close()
    assert supervisor.proc.poll() is None, "the supervisor died"
    assert client.exec(container, ["echo", "still here"])["stdout"] == b"still here\n"


SETTINGS = dict(deadline=None,
                suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------ random bytes

VALID_FRAME = codec.pack({"v": 1, "id": 1, "op": "exec", "container": "c", "argv": ["true"],
                          "env": {"A": "b"}, "timeout": 1.5, "capture": 10, "stdin": b"in"})


@st.composite
def mutated_bytes(draw) -> bytes:
    """A valid frame with bytes flipped, inserted, deleted or truncated."""
    data = bytearray(VALID_FRAME)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        if kind == "flip":
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and len(data) > 1:
            del data[i]
        elif kind == "truncate":
            del data[max(i, 1):]
    return bytes(data)


# Hand-made frames that attack the decoder's limits rather than its grammar.
NASTY_FRAMES = [
    b"\x91" * 100_000,                       # arrays nested 100000 deep
    b"\x81\xa1k" * 50_000,                   # maps nested 50000 deep
    b"\xdb\xff\xff\xff\xff",                 # str32 declaring 4 GiB
    b"\xc6\xff\xff\xff\xff",                 # bin32 declaring 4 GiB
    b"\xdd\xff\xff\xff\xff",                 # array32 declaring 4 G entries
    b"\xdf\xff\xff\xff\xff",                 # map32 declaring 4 G entries
    b"\xc7\x01\x05x",                        # ext type
    b"\xd4\xff\x00",                         # fixext (timestamp-like)
    b"\x80" + b"\x00" * 1000,                # a map followed by trailing bytes
    b"\x81\x01\x02",                         # a map with an int key
    b"\x81\xc0\x02",                         # a map with a nil key
    b"\x81\xc4\x01v\x01",                    # a map with a bin key
    b"\x82\xa1v\x01\xa1v\x02",               # duplicate keys
    b"\xa2\xff\xfe",                         # invalid UTF-8
    b"\xa3\xed\xa0\x80",                     # a UTF-8 encoded surrogate
    b"\xdd\x00\x01\x00\x01" + b"\xc0" * 65537,  # 65537-entry array, over the decoder's cap
]

byte_frames = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=64, max_size=4096),
    mutated_bytes(),
    st.sampled_from(NASTY_FRAMES),
)


def test_random_bytes_get_one_reply_each(fuzz):
    @settings(max_examples=700, **SETTINGS)
    @given(st.lists(byte_frames, min_size=1, max_size=6))
    def run(batch):
        fuzz.send_batch(batch)

    with fuzz.bounded("random and mutated bytes"):
        run()


# -------------------------------------------------------------- random msgpack values

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=10), st.binary(max_size=10)), children, max_size=6)),
    max_leaves=15,
)
# Maps that look like requests: protocol keys with random values. `attach` only with
# an invalid pid: a valid one would really attach to a host process.
small_values = st.one_of(scalars, st.lists(scalars, max_size=4),
                         st.dictionaries(st.text(max_size=6), scalars, max_size=3))
request_like = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), scalars), "op": st.one_of(st.sampled_from(messages.OPS), scalars)},
    optional={"id": small_values, "container": small_values, "argv": small_values, "env": small_values,
              "cwd": small_values, "user": small_values, "timeout": small_values,
              "stdin": small_values, "capture": small_values, "privileged": small_values,
              "pid": st.one_of(st.integers(-(2**63), 0), st.text(max_size=5), st.floats(), st.none())},
)
msgpack_frames = st.one_of(values, request_like).map(codec.pack)


def test_random_msgpack_values_get_one_reply_each(fuzz):
    @settings(max_examples=600, **SETTINGS)
    @given(st.lists(msgpack_frames, min_size=1, max_size=5))
    def run(batch):
        fuzz.send_batch(batch)

    with fuzz.bounded("random msgpack values"):
        run()


# ---------------------------------------------------------- mutated valid exec requests

DELETE = object()
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
nul_text = st.text(max_size=20).map(lambda s: s[: len(s) // 2] + "\0" + s[len(s) // 2:])
wrong_scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.binary(max_size=20),
                          st.lists(ints, max_size=3), st.dictionaries(st.text(max_size=3), ints, max_size=2))
unknown_names = st.text(string.ascii_lowercase + "-_.", min_size=1, max_size=16).map(lambda s: "zz" + s)
huge_text = st.integers(messages.MAX_STR + 1, messages.MAX_STR + 64).map(lambda n: "a" * n)


def _bad(container: str) -> dict:
    """Per field, values that make the request fail: at validation (BAD_REQUEST,
    UNSUPPORTED_VERSION) or before anything runs (NO_SUCH_CONTAINER, NO_SUCH_USER,
    BAD_CWD, SPAWN_FAILED)."""
    return {
        "v": st.one_of(st.sampled_from([0, 2, -1, 2**64 - 1, 1.0, True, "1", b"\x01", None, DELETE]),
                       wrong_scalars),
        "op": st.one_of(st.sampled_from(["", "EXEC", "exec\0", "exe", "spawn", "kill", "ping ", DELETE]),
                        st.text(max_size=12).filter(lambda op: op not in messages.OPS), wrong_scalars),
        "container": st.one_of(
            st.sampled_from(["", DELETE, container + "x", container.upper(), " " + container,
                             container + "\0", "../" + container, "*", "."]),
            nul_text, huge_text, wrong_scalars, unknown_names),
        "argv": st.one_of(
            st.sampled_from([[], [""], ["true", "\0"], ["\0"], DELETE, ["true"] * (messages.MAX_ARGS + 1)]),
            wrong_scalars, st.lists(wrong_scalars, min_size=1, max_size=3),
            st.lists(nul_text, min_size=1, max_size=3), huge_text.map(lambda s: ["echo", s])),
        "env": st.one_of(
            wrong_scalars,
            st.sampled_from([{"": "x"}, {"A=B": "x"}, {"A": "\0"}, {"A\0": "x"}, {"A": 5}, {b"A": "x"},
                             {"A": None}, {f"K{i}": "v" for i in range(messages.MAX_ENV + 1)},
                             {"A": "b" * (messages.MAX_STR + 1)}])),
        "cwd": st.one_of(st.sampled_from(["", "relative", "/\0", "/no/such/dir", "/" + "x" * 5000]),
                         wrong_scalars, huge_text),
        "user": st.one_of(st.sampled_from(["", "root:nogroupzz", ":zzgroup", "zz:0"]), nul_text,
                          wrong_scalars.filter(lambda u: u is not None), huge_text, unknown_names,
                          unknown_names.map(lambda g: "alice:" + g)),
        "timeout": st.one_of(
            st.sampled_from([0, 0.0, -1, -1e-9, -(2**63), 2**64 - 1, 1e300, float("inf"), float("-inf"),
                             float("nan"), messages.MAX_TIMEOUT + 1, True, False, "5", b"5", [5]]),
            st.floats(max_value=0.0), st.floats(min_value=messages.MAX_TIMEOUT, exclude_min=True)),
        "stdin": st.one_of(st.sampled_from(["text", [b"x"], True, b"x" * (messages.MAX_STDIN + 1)]), ints),
        "capture": st.one_of(
            st.sampled_from([-1, -(2**63), 2**64 - 1, messages.MAX_CAPTURE + 1, 1.5, True, "10"]),
            st.integers(-(2**63), -1), st.integers(messages.MAX_CAPTURE + 1, 2**64 - 1)),
        "privileged": st.one_of(st.sampled_from([0, 1, "true", b"", [], {}]), st.floats()),
    }


def _odd_but_valid() -> dict:
    """Per field, values that are strange but valid: such a request runs."""
    return {
        "id": st.one_of(small_values, st.binary(min_size=1000, max_size=2000), st.just(DELETE)),
        "argv": st.sampled_from([["no-such-command-at-all"],  # exit 127
                                 ["/"],                       # a directory: exit 126
                                 ["true", "", "x"]]),         # empty later arguments
        "env": st.dictionaries(st.text(string.ascii_uppercase, min_size=1, max_size=8),
                               st.text(max_size=8).filter(lambda v: "\0" not in v), max_size=4),
        "timeout": st.floats(min_value=1e-300, max_value=1e-3),  # killed at once, or never started
        "stdin": st.binary(max_size=64),
        "capture": st.integers(0, 16),
        "privileged": st.booleans(),
        "user": st.sampled_from(KNOWN_USERS),
        "extra": st.dictionaries(st.text(max_size=8).filter(lambda k: k != "pid"), small_values, max_size=3),
    }


def mutated_exec(container: str) -> st.SearchStrategy[bytes]:
    """A valid exec of `true` with one to three fields made wrong, or (one in twenty)
    with only odd-but-valid changes, which runs: not more, as each run is a real exec in
    the session container."""
    return _mutated_exec(container, _bad(container), _odd_but_valid())


def _all_but_one_in(n: int, seed: bytes) -> bool:
    """True except one time in n: for a uniform seed, and for hypothesis's favourite
    seed (zeros), which it draws far more often than one time in n."""
    return int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % n != 0 or not any(seed)


@st.composite
def _mutated_exec(draw, container: str, bad: dict, odd: dict) -> bytes:
    req: dict = {"v": 1, "id": draw(st.integers(0, 2**32)), "op": "exec", "container": container,
                 "argv": ["true"]}
    changes = []
    if _all_but_one_in(20, draw(st.binary(min_size=8, max_size=8))):
        field = draw(st.sampled_from(sorted(bad)))
        changes = [(field, draw(bad[field]))]
    others = sorted(set(odd) - {f for f, _ in changes})  # the bad value stays bad
    for _ in range(draw(st.integers(0 if changes else 1, 2))):
        field = draw(st.sampled_from(others))
        changes.append((field, draw(odd[field])))
    for field, value in changes:
        if field == "extra":
            req.update({k: v for k, v in value.items() if k not in req})
        elif value is DELETE:
            req.pop(field, None)
        else:
            req[field] = value
    if req.get("op") == "attach":  # never a real attach of a host process
        req["pid"] = -1
    return codec.pack(req)


def test_mutated_exec_requests_get_one_reply_each(fuzz, container):
    strategy = mutated_exec(container)

    @settings(max_examples=800, **SETTINGS)
    @given(st.lists(strategy, min_size=1, max_size=5))
    def run(batch):
        fuzz.send_batch(batch)

    with fuzz.bounded("mutated exec requests"):
        run()
    assert fuzz.ok_replies > 0, "no mutated request was valid: the exec path was not exercised"


def test_envelopes_of_any_shape_are_echoed_once(fuzz, container):
    """REQ-style ([""][payload]) and multi-frame envelopes: one reply per message."""
    ping = codec.pack({"v": 1, "id": "p", "op": "ping"})
    exec_ = codec.pack({"v": 1, "id": "e", "op": "exec", "container": container, "argv": ["true"]})
    fuzz.send_batch([[b"", ping], [b"", b"\xc1"], [b"a", b"b", exec_], [b"", b"", b"x" * 1000, b"\x80"],
                     [os.urandom(64), ping]])


# ------------------------------------------------------------------- frames too large

def _wait_event(monitor: zmq.Socket, event: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if monitor.poll(int((deadline - time.monotonic()) * 1000) + 1):
            from zmq.utils.monitor import recv_monitor_message
            if recv_monitor_message(monitor)["event"] == event:
                return
    raise AssertionError(f"no zmq event {event} within {timeout}s")


def test_frame_over_4mib_is_dropped_by_zmq_and_the_client_reconnects(supervisor, container):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    monitor = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        s.connect(supervisor.endpoint)
        _wait_event(monitor, zmq.EVENT_CONNECTED, 5)
        s.send(b"\x80" + b"\x00" * codec.MAX_MESSAGE)  # one byte over ZMQ_MAXMSGSIZE
        _wait_event(monitor, zmq.EVENT_DISCONNECTED, 5)  # zmq cut the connection ...
        assert supervisor.proc.poll() is None           # ... and nothing else happened
        _wait_event(monitor, zmq.EVENT_CONNECTED, 5)     # the DEALER reconnects by itself
        assert not s.poll(0), "a dropped frame must not be answered"
        # A frame of exactly 4 MiB passes both limits and gets its (error) reply.
        at_limit = codec.pack({"v": 1, "id": "big", "op": "exec", "container": container,
                               "argv": ["true"], "stdin": b""})
        pad = codec.MAX_MESSAGE - len(at_limit) - 6  # a bin32 header and a 1-char key
        at_limit = codec.pack({"v": 1, "id": "big", "op": "exec", "container": container,
                               "argv": ["true"], "stdin": b"x" * pad})
        assert len(at_limit) <= codec.MAX_MESSAGE
        s.send(at_limit)
        assert s.poll(10000)
        reply = codec.unpack(s.recv())
        assert reply["id"] == "big" and reply["error"]["code"] == errors.BAD_REQUEST  # stdin > 1 MiB
    finally:
        s.disable_monitor()
        monitor.close()
        s.close()
    with Client(supervisor.endpoint) as fresh:
        assert fresh.ping()["pid"] == supervisor.proc.pid
        assert fresh.exec(container, ["echo", "ok"])["stdout"] == b"ok\n"


def _flood_during_exec(supervisor, container: str, frames: int,
                       max_seconds: float | None = None) -> tuple[dict, float, int]:
    """Client A starts a 0.5 s exec; client B floods garbage (`frames` frames, or what
    it can send in max_seconds, then one oversize frame). Return A's reply, its
    latency and the number of frames B sent."""
    with Client(supervisor.endpoint) as a:
        rid = a.submit("exec", container=container, argv=["sh", "-c", "sleep 0.5; echo survived"])
        t0 = time.monotonic()
        b = zmq.Context.instance().socket(zmq.DEALER)
        b.setsockopt(zmq.LINGER, 0)
        b.setsockopt(zmq.SNDHWM, 0)
        b.connect(supervisor.endpoint)
        try:
            junk = [b"", b"\xc1", b"\x91" * 10000, codec.pack([1, 2]),
                    codec.pack({"v": 1, "op": "exec", "container": container, "argv": []}),
                    codec.pack({"v": 1, "op": "exec", "container": container, "argv": ["true"],
                                "user": "nosuchuser"}),
                    codec.pack({"v": 1, "op": "exec", "container": "nope", "argv": ["true"]})]
            sent = 0
            while sent < frames and (max_seconds is None or time.monotonic() - t0 < max_seconds):
                for frame in junk:
                    b.send(frame)
                sent += len(junk)
            b.send(b"\x80" + b"\x00" * codec.MAX_MESSAGE)
            reply = a.result(rid, timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            b.close()
        assert reply["exit_code"] == 0 and reply["stdout"] == b"survived\n"
        assert a.exec(container, ["true"])["exit_code"] == 0
    assert supervisor.proc.poll() is None
    print(f"\nclient B sent {sent} garbage frames; A's 0.5 s exec answered in {elapsed:.2f}s")
    return reply, elapsed, sent


def test_garbage_from_one_client_never_hurts_another_clients_exec(supervisor, container):
    _flood_during_exec(supervisor, container, frames=20_000, max_seconds=0.4)


# ------------------------------------------------- CurveZMQ endpoint, restricted key

@pytest.fixture(scope="module")
def curve(box, tmp_path_factory):
    """A supervisor on tcp://127.0.0.1 with CurveZMQ: key `monitor` may exec only into
    one container, as its own user, unprivileged; key `admin` may do everything; key
    `stranger` is not authorised."""
    allowed, other = box.run("curve-fuzz"), box.run("curve-other")
    sup = CurveSupervisor(box, str(tmp_path_factory.mktemp("curve")),
                          f'containers = ["{allowed}"]\nusers = [""]\nprivileged = false\nadmin = false',
                          strangers=("stranger",))
    try:
        with sup.client("admin") as c:
            wait_for(lambda: _pings(c), 15, "the CurveZMQ supervisor to answer")
            wait_ready(c, allowed)
            wait_ready(c, other)
            assert c.exec(allowed, ["true"])["exit_code"] == 0
            # pyzmq's garbage-collector thread (the first zero-copy reply starts it): baseline
            assert len(c.exec(allowed, ["head", "-c", "65536", "/dev/zero"])["stdout"]) == 65536
        yield sup.proc, sup.endpoint, sup.key, sup.client, allowed
    finally:
        assert sup.stop() == 0
        box.delete(allowed)
        box.delete(other)


def _pings(c: Client) -> bool:
    try:
        return bool(c.ping(timeout=0.5))
    except WarmexecError:
        return False


def test_curve_restricted_key_gets_one_reply_per_hostile_message(curve):
    proc, endpoint, key, _, allowed = curve
    fuzz = Fuzz(endpoint, proc.pid, key("monitor"))
    fuzz.send_batch([b"\xc1", codec.pack({"v": 1, "op": "exec", "container": allowed, "argv": ["true"],
                                          "user": "alice"})])  # warm: a FORBIDDEN, a BAD_REQUEST
    strategy = st.one_of(byte_frames, msgpack_frames, mutated_exec(allowed))

    @settings(max_examples=300, **SETTINGS)
    @given(st.lists(strategy, min_size=1, max_size=5))
    def run(batch):
        fuzz.send_batch(batch)

    try:
        with fuzz.bounded("hostile messages over CurveZMQ, restricted key"):
            run()
    finally:
        fuzz.close()
    assert fuzz.codes.get(errors.FORBIDDEN), "the access list was never exercised"


def test_curve_unauthorised_keys_and_raw_tcp_garbage_are_dropped(curve):
    proc, endpoint, key, client, allowed = curve
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    usage0 = psutil.Process(proc.pid).num_fds()
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 0)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = key("stranger")
    s.connect(endpoint)
    try:
        for _ in range(100):  # queued, never delivered: the handshake is refused
            with contextlib.suppress(zmq.Again):
                s.send(codec.pack({"v": 1, "id": 1, "op": "exec", "container": allowed, "argv": ["true"]}))
        assert not s.poll(500), "an unauthorised key got a reply"
    finally:
        s.close()
    # not ZMTP at all, a greeting with absurd lengths, and a greeting then garbage
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 31
    for junk in (os.urandom(1 << 20), b"\xff" + b"\xff" * 8 + b"\x7f" + os.urandom(4096),
                 greeting + os.urandom(65536), greeting[:10]):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with contextlib.suppress(OSError):  # zmq may cut us off mid-send
                raw.sendall(junk)
                raw.shutdown(socket.SHUT_WR)
                raw.recv(1 << 16)
    assert proc.poll() is None
    with client("monitor") as c:
        assert c.exec(allowed, ["echo", "fine"])["stdout"] == b"fine\n"
    wait_for(lambda: psutil.Process(proc.pid).num_fds() <= usage0 + FD_SLACK, 10,
             "the supervisor's fds to settle")


# ------------------------------------------------------------------------ bounds

def test_multipart_envelope_is_bounded(supervisor):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(supervisor.endpoint)
    try:
        garbage = [b"\x00" * MIB] * 8
        s.send_multipart([*garbage, codec.pack({"v": 1, "id": 1, "op": "ping"})])
        echoed = 0
        if s.poll(5000):  # answered or dropped: either is fine, an 8 MiB echo is not
            echoed = sum(len(p) for p in s.recv_multipart())
    finally:
        s.close()
    assert echoed < 64 * 1024, f"the supervisor echoed {echoed / MIB:.1f} MiB of envelope back"
    assert supervisor.proc.poll() is None


def test_a_flood_neither_delays_another_clients_reply_nor_bloats_the_supervisor(box, container, tmp_path):
    sup = Supervisor(box, str(tmp_path))  # a fresh one: its memory says what the flood cost
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            assert c.exec(container, ["true"])["exit_code"] == 0
        hwm0 = _peak_rss(sup.proc.pid)
        _, elapsed, _ = _flood_during_exec(sup, container, frames=100_000)
        peak = _peak_rss(sup.proc.pid) - hwm0
        print(f"supervisor peak RSS +{peak / MIB:.0f} MiB")
    finally:
        assert sup.stop() == 0
    assert elapsed < 1.5, f"a 0.5 s exec was answered after {elapsed:.2f}s"
    assert peak < 64 * MIB, f"the flood raised the supervisor's peak RSS by {peak / MIB:.0f} MiB"


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_curve_list_shows_a_restricted_key_only_its_containers(curve):
    _, _, _, client, allowed = curve
    with client("monitor") as c:
        seen = {row["id"] for row in c.list()}
    assert seen <= {allowed}, f"a key limited to {allowed} was shown {sorted(seen - {allowed})}"

