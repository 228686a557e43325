"""Unit tests for protocol/codec.py and protocol/messages.py (no sockets)."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmexec.protocol import codec, errors, messages
from warmexec.protocol.codec import ProtocolError
from warmexec.protocol.errors import WarmexecError

CANONICAL = {"v": 1, "id": 7, "op": "exec", "container": "c1", "argv": ["true"]}
# Hard-coded on purpose: any change to the wire encoding must be a deliberate diff here.
CANONICAL_BYTES = bytes.fromhex(
    "85"                          # fixmap, 5 entries
    "a176" "01"                   # "v": 1
    "a26964" "07"                 # "id": 7
    "a26f70" "a465786563"         # "op": "exec"
    "a9636f6e7461696e6572" "a26331"  # "container": "c1"
    "a461726776" "91" "a474727565"  # "argv": ["true"]
)


# ----------------------------------------------------------------------------- codec

def test_golden_bytes_of_canonical_request():
    assert codec.pack(CANONICAL) == CANONICAL_BYTES
    assert codec.unpack_map(CANONICAL_BYTES) == CANONICAL


@pytest.mark.parametrize("obj", [
    {},
    {"a": None, "b": True, "c": False},
    {"int": -(2**63), "uint": 2**64 - 1, "f": 1.5, "neg": -1},
    {"s": "héllo \u2603", "b": b"\x00\xff", "empty": b"", "es": ""},
    {"nested": {"list": [1, [2, [3, {"k": b"v"}]]], "m": {}}},
    {b"bytes-key": 1, "str-key": 2},
])
def test_round_trip(obj):
    assert codec.unpack_map(codec.pack(obj)) == obj


def test_bytes_and_str_stay_distinct():
    out = codec.unpack_map(codec.pack({"s": "x", "b": b"x"}))
    assert type(out["s"]) is str and type(out["b"]) is bytes


def test_tuples_come_back_as_lists():
    assert codec.unpack(codec.pack((1, 2))) == [1, 2]


def test_unpack_non_map_values_but_unpack_map_rejects_them():
    for value in (1, "x", b"x", [1, 2], None, True, 1.0):
        data = codec.pack(value)
        assert codec.unpack(data) == value
        with pytest.raises(ProtocolError) as info:
            codec.unpack_map(data)
        assert info.value.code == errors.BAD_REQUEST


def test_oversize_frame_rejected_before_decoding():
    data = codec.pack({"blob": b"x" * 100})
    assert codec.unpack_map(data, max_size=len(data)) == {"blob": b"x" * 100}
    with pytest.raises(ProtocolError):
        codec.unpack_map(data, max_size=len(data) - 1)
    # Garbage over the limit is refused by size, not by the decoder.
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.unpack(b"\xc1" * 11, max_size=10)


def test_default_limit_is_max_message():
    big = b"\xa0" + b"\x00" * codec.MAX_MESSAGE  # one byte over the limit
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.unpack(big)


def test_declared_length_beyond_limit_rejected():
    # A bin32 header announcing 1 GiB in a tiny frame.
    with pytest.raises(ProtocolError):
        codec.unpack(b"\xc6\x40\x00\x00\x00" + b"x" * 10)
    # A map header announcing 2**32-1 entries.
    with pytest.raises(ProtocolError):
        codec.unpack(b"\xdf\xff\xff\xff\xff\xa1a\x01")


@pytest.mark.parametrize("data", [
    b"\x81\xa1s\xa2\xff\xfe",         # {"s": <invalid utf-8>}
    b"\x81\xa2\xc3\x28\x01",          # invalid utf-8 in a key
    b"\xa1\x80",                      # bare invalid utf-8 string
])
def test_invalid_utf8_rejected(data):
    with pytest.raises(ProtocolError):
        codec.unpack(data)


@pytest.mark.parametrize("data", [
    b"\xd4\x05\x00",                  # fixext1, type 5
    b"\xd6\xff\x00\x00\x00\x00",      # timestamp32 (type -1)
    b"\xc7\x03\x07abc",               # ext8, type 7
    b"\x81\xa1a\xd5\x01\x00\x00",     # ext nested in a map
    msgpack.packb(msgpack.ExtType(42, b"payload")),
])
def test_ext_types_rejected(data):
    with pytest.raises(ProtocolError):
        codec.unpack(data)


def test_zero_length_ext_rejected():
    with pytest.raises(ProtocolError):
        codec.unpack(b"\x81\xa1a\xc7\x00\x05")


@pytest.mark.parametrize("data", [
    b"",                              # nothing
    b"\xc1",                          # never-used type byte
    b"\x82\xa1a\x01",                 # truncated map
    b"\x81\x01\x02",                  # int map key (strict_map_key)
    b"\x81\x80\x02",                  # map as a map key
    b"\x80\x80",                      # trailing data
    b"\x91" * 5000 + b"\xc0",         # nesting deeper than the decoder's stack
])
def test_malformed_frames_rejected(data):
    with pytest.raises(ProtocolError) as info:
        codec.unpack(data)
    assert info.value.code == errors.BAD_REQUEST


def test_protocol_error_carries_code():
    e = ProtocolError("boom", code="X")
    assert (e.code, e.message, str(e)) == ("X", "boom", "boom")


# ----------------------------------------------------------------- fuzz: codec

def _only_protocol_errors(data: bytes) -> None:
    try:
        out = codec.unpack_map(data)
    except ProtocolError:
        return
    assert isinstance(out, dict)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_only_raise_protocol_error(data):
    _only_protocol_errors(data)


def _mutate(script: bytes) -> bytes:
    """Edit the canonical frame as driven by `script`, 3 bytes per edit (kind, position,
    argument): flip a bit, set a byte, insert, delete, truncate or append."""
    frame = bytearray(CANONICAL_BYTES)
    for i in range(0, len(script) - 2, 3):
        kind, pos, arg = script[i] % 6, script[i + 1], script[i + 2]
        pos = min(pos, len(frame) - 1) if frame else 0
        if kind == 0 and frame:
            frame[pos] ^= 1 << (arg & 7)
        elif kind == 1 and frame:
            frame[pos] = arg
        elif kind == 2:
            frame.insert(pos, arg)
        elif kind == 3:
            del frame[pos:pos + 1 + (arg & 3)]
        elif kind == 4:
            del frame[pos:]
        else:
            frame.append(arg)
    return bytes(frame)


def test_mutate_helper_edits():
    assert _mutate(b"") == CANONICAL_BYTES
    assert _mutate(bytes([0, 0, 0])) == bytes([CANONICAL_BYTES[0] ^ 1]) + CANONICAL_BYTES[1:]
    assert _mutate(bytes([4, 3, 0])) == CANONICAL_BYTES[:3]
    assert _mutate(bytes([5, 0, 0xC1])) == CANONICAL_BYTES + b"\xc1"


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=3, max_size=24))
def test_fuzz_mutated_frames_only_raise_protocol_error(script):
    _only_protocol_errors(_mutate(script))


# -------------------------------------------------------------- fuzz: messages

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8) | st.binary(max_size=8))
_keys = st.text(max_size=8) | st.binary(max_size=4)
# Any msgpack-able value: scalars, lists and maps (str/bytes keys, as unpack_map allows).
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=6,
)
# Mostly-plausible values per field, so the validator often gets past the first checks;
# any field may also be any value at all, and all but the first four may be absent.
_plausible = {
    "v": st.sampled_from([1, 1, 1, 0, 2, "1", 1.0, True]),
    "op": st.sampled_from(list(messages.OPS) + ["", "EXEC", "nope"]),
    "container": st.text(min_size=1, max_size=8),
    "argv": (st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4)
             | st.lists(st.text(max_size=6) | _scalars, max_size=4)),
    "id": st.integers(-(2**63), 2**64 - 1) | st.text(max_size=4),
    "env": (st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4)
            | st.dictionaries(_keys, st.text(max_size=6) | _scalars, max_size=4)),
    "cwd": st.sampled_from(["/", "/tmp", "tmp", "", "/a\0b"]) | st.text(max_size=6),
    "user": st.text(max_size=6),
    "timeout": st.floats() | st.integers(-5, 10**7) | st.booleans(),
    "stdin": st.binary(max_size=8) | st.text(max_size=4),
    "capture": st.integers(-5, messages.MAX_CAPTURE + 5) | st.booleans(),
    "privileged": st.booleans() | st.integers(0, 1),
}
_REQUIRED = ("v", "op", "container", "argv")
# One level of nesting per field keeps this fast; deep nesting is the next test's job.
_flat = _scalars | st.lists(_scalars, max_size=3) | st.dictionaries(_keys, _scalars, max_size=3)


def _field(plausible):
    """A plausible value three times out of four, else anything (a plain `|` would be
    flattened by hypothesis into one union where the plausible branch is rare)."""
    return st.integers(0, 3).flatmap(lambda i: _flat if i == 0 else plausible)


requests = st.fixed_dictionaries(
    {name: _field(_plausible[name]) for name in _REQUIRED},
    optional={name: _field(strategy) for name, strategy in _plausible.items()
              if name not in _REQUIRED})
# Arbitrary maps of arbitrarily nested values, keyed mostly by the real field names.
arbitrary_maps = st.dictionaries(st.sampled_from(sorted(_plausible)) | _keys, _values, max_size=6)


def _validate(req: dict) -> None:
    try:
        req_id, op = messages.check_envelope(req)
    except WarmexecError as exc:
        assert exc.code in (errors.UNSUPPORTED_VERSION, errors.BAD_REQUEST)
    else:
        assert op in messages.OPS and req_id is req.get("id")
    try:
        parsed = messages.parse_exec(req)
    except WarmexecError as exc:
        assert exc.code == errors.BAD_REQUEST
    else:
        assert isinstance(parsed, messages.ExecRequest)
        assert parsed.argv and all(isinstance(a, str) for a in parsed.argv)
        assert parsed.timeout is None or 0 < parsed.timeout <= messages.MAX_TIMEOUT
        assert 0 <= parsed.capture <= messages.MAX_CAPTURE
        assert type(parsed.privileged) is bool


def _validate_on_and_off_the_wire(req: dict) -> None:
    _validate(req)
    # And what the supervisor actually sees: the same map after a trip over the wire.
    try:
        decoded = codec.unpack_map(codec.pack(req))
    except ProtocolError:
        return
    _validate(decoded)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests)
def test_fuzz_validators_only_raise_warmexec_error(req):
    _validate_on_and_off_the_wire(req)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(arbitrary_maps)
def test_fuzz_validators_on_nested_values_only_raise_warmexec_error(req):
    _validate_on_and_off_the_wire(req)


# ---------------------------------------------------------- messages validation

def _exec(**over):
    req = dict(CANONICAL)
    req.update(over)
    return req


def test_check_envelope_returns_id_and_op():
    assert messages.check_envelope(CANONICAL) == (7, "exec")
    assert messages.check_envelope({"v": 1, "op": "ping"}) == (None, "ping")


@pytest.mark.parametrize("v", [None, 0, 2, "1", b"1", [1]])
def test_version_mismatch(v):
    req = _exec(v=v) if v is not None else {k: x for k, x in CANONICAL.items() if k != "v"}
    with pytest.raises(WarmexecError) as info:
        messages.check_envelope(req)
    assert info.value.code == errors.UNSUPPORTED_VERSION


@pytest.mark.parametrize("op", [None, "", "EXEC", "nope", 1, ["exec"], {"exec": 1}])
def test_bad_op(op):
    with pytest.raises(WarmexecError) as info:
        messages.check_envelope(_exec(op=op))
    assert info.value.code == errors.BAD_REQUEST


def test_parse_exec_defaults():
    r = messages.parse_exec(CANONICAL)
    assert r == messages.ExecRequest(container="c1", argv=["true"])
    assert (r.env, r.cwd, r.user, r.timeout, r.stdin) == ({}, None, None, None, b"")
    assert (r.capture, r.privileged) == (messages.DEFAULT_CAPTURE, False)


def test_parse_exec_full():
    r = messages.parse_exec(_exec(argv=["sh", "-c", "", "x"], env={"A": "1", "EMPTY": ""},
                                  cwd="/tmp", user="1000:1000", timeout=5, stdin=b"in",
                                  capture=0, privileged=True))
    assert r.argv == ["sh", "-c", "", "x"]
    assert r.env == {"A": "1", "EMPTY": ""}
    assert (r.cwd, r.user, r.stdin, r.capture, r.privileged) == ("/tmp", "1000:1000", b"in", 0, True)
    assert r.timeout == 5.0 and type(r.timeout) is float


def test_parse_exec_limits_inclusive():
    r = messages.parse_exec(_exec(timeout=messages.MAX_TIMEOUT, capture=messages.MAX_CAPTURE,
                                  stdin=b"x" * messages.MAX_STDIN))
    assert (r.timeout, r.capture) == (messages.MAX_TIMEOUT, messages.MAX_CAPTURE)


def test_parse_exec_null_optionals_mean_default():
    r = messages.parse_exec(_exec(env=None, cwd=None, user=None, timeout=None, stdin=None,
                                  capture=None, privileged=None))
    assert r == messages.ExecRequest(container="c1", argv=["true"])


BAD = {
    "missing container": {"container": None},
    "empty container": {"container": ""},
    "container not str": {"container": b"c1"},
    "missing argv": {"argv": None},
    "empty argv": {"argv": []},
    "argv not list": {"argv": "true"},
    "argv0 empty": {"argv": [""]},
    "argv int entry": {"argv": ["echo", 1]},
    "argv bytes entry": {"argv": [b"true"]},
    "argv None entry": {"argv": ["echo", None]},
    "argv NUL": {"argv": ["echo", "a\0b"]},
    "argv0 NUL": {"argv": ["tr\0ue"]},
    "argv too many": {"argv": ["x"] * (messages.MAX_ARGS + 1)},
    "argv entry too long": {"argv": ["x" * (messages.MAX_STR + 1)]},
    "env not map": {"env": ["A=1"]},
    "env key with =": {"env": {"A=B": "1"}},
    "env empty key": {"env": {"": "1"}},
    "env key bytes": {"env": {b"A": "1"}},
    "env value int": {"env": {"A": 1}},
    "env value NUL": {"env": {"A": "x\0y"}},
    "env key NUL": {"env": {"A\0": "x"}},
    "relative cwd": {"cwd": "tmp"},
    "empty cwd": {"cwd": ""},
    "cwd not str": {"cwd": 1},
    "cwd NUL": {"cwd": "/tmp\0"},
    "empty user": {"user": ""},
    "user not str": {"user": 1000},
    "bool timeout": {"timeout": True},
    "false timeout": {"timeout": False},
    "str timeout": {"timeout": "5"},
    "zero timeout": {"timeout": 0},
    "negative timeout": {"timeout": -1},
    "huge timeout": {"timeout": messages.MAX_TIMEOUT + 1},
    "inf timeout": {"timeout": math.inf},
    "nan timeout": {"timeout": math.nan},
    "stdin str": {"stdin": "text"},
    "stdin list": {"stdin": [1, 2]},
    "stdin too big": {"stdin": b"x" * (messages.MAX_STDIN + 1)},
    "capture negative": {"capture": -1},
    "capture huge": {"capture": messages.MAX_CAPTURE + 1},
    "capture float": {"capture": 1.0},
    "capture bool": {"capture": True},
    "privileged int": {"privileged": 1},
    "privileged str": {"privileged": "yes"},
}


@pytest.mark.parametrize("over", list(BAD.values()), ids=list(BAD))
def test_parse_exec_rejects(over):
    with pytest.raises(WarmexecError) as info:
        messages.parse_exec(_exec(**over))
    assert info.value.code == errors.BAD_REQUEST


def test_parse_attach_and_detach():
    assert messages.parse_attach({"container": "c", "pid": 12}) == ("c", 12)
    for pid in (0, -1, True, "12", 1.0, None):
        with pytest.raises(WarmexecError) as info:
            messages.parse_attach({"container": "c", "pid": pid})
        assert info.value.code == errors.BAD_REQUEST
    assert messages.parse_detach({"container": "c"}) == "c"
    with pytest.raises(WarmexecError):
        messages.parse_detach({})


def test_replies_round_trip():
    ok = messages.ok_reply(7, pid=3, exit_code=0)
    assert ok == {"v": 1, "id": 7, "ok": True, "pid": 3, "exit_code": 0}
    err = messages.error_reply("x", errors.NOT_FOUND, "nope")
    assert err == {"v": 1, "id": "x", "ok": False,
                   "error": {"code": "NOT_FOUND", "message": "nope"}}
    for reply in (ok, err):
        assert codec.unpack_map(codec.pack(reply)) == reply
