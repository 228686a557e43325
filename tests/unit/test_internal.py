"""The internal messages: each constructor matches its schema, and check() holds the line."""

from __future__ import annotations

import inspect

import pytest

from warmexec.protocol import codec, internal

SAMPLES = {
    internal.FORK: internal.fork(1, None),
    internal.FORKED: internal.forked(1, 42),
    internal.JOIN: internal.join({"id": "c"}, None, False),
    internal.READY: internal.ready(42, 0, 0),
    internal.FATAL: internal.fatal("", 1, "no"),
    internal.SPAWN: internal.spawn(1, ["true"], {}, None, 0, False, False, 0),
    internal.ACK: internal.ack(3),
    internal.RESIZE: internal.resize(1, 24, 80),
    internal.STARTED: internal.started(1, 7, 1.5),
    internal.FAILED: internal.failed(1, 2, "lookup"),
    internal.OUT: internal.out(1, 1, b"x"),
    internal.EXITED: internal.exited(1, 1, 0, 0.0, 0.0, 0, 7, 1.5, b"", b"", 0, 0),
}


def test_every_op_has_a_constructor_whose_message_fits_its_schema() -> None:
    assert set(SAMPLES) == set(internal.SCHEMA)
    for op, msg in SAMPLES.items():
        assert internal.check(msg, frozenset((op,))) == op
        assert set(msg) == {"op", *internal.SCHEMA[op]}
        back = codec.unpack_map(codec.pack(msg))  # survives the wire as it is
        assert internal.check(back, frozenset((op,))) == op


def test_constructor_arguments_are_the_schema_fields() -> None:
    names = {internal.ACK: ["seq"]}  # ack(seq) fills the field "ack"
    for op in internal.SCHEMA:
        params = [p.name for p in inspect.signature(getattr(internal, op)).parameters.values()
                  if p.kind != p.VAR_KEYWORD]  # spawn(**streamed): the OPTIONAL fields
        assert params == names.get(op, list(internal.SCHEMA[op])), op


def test_a_streamed_spawn_carries_its_optional_fields_and_nothing_else() -> None:
    ops = frozenset((internal.SPAWN,))
    one_shot = internal.spawn(1, ["true"], {}, None, 0, False, False, 0)
    assert "streams" not in one_shot  # the probes' spawn is as it was
    streamed = internal.spawn(1, ["sh"], {}, None, 0, True, True, 0, streams=True)
    assert internal.check(streamed, ops) == internal.SPAWN
    with pytest.raises(internal.BadMessage):
        internal.check({**streamed, "streams": 1}, ops)  # typed like the rest
    with pytest.raises(internal.BadMessage):
        internal.check({**one_shot, "other": True}, ops)  # only the OPTIONAL ones


@pytest.mark.parametrize("change", [
    {"op": "spawn"},  # not from a worker
    {"op": None},
    {"id": True},  # a bool is not an int
    {"id": "1"},
    {"status": 1.0},
    {"stdout": "text"},
    {"extra": 1},
])
def test_check_refuses_what_a_worker_must_not_send(change: dict) -> None:
    msg = {**SAMPLES[internal.EXITED], **change}
    with pytest.raises(internal.BadMessage):
        internal.check(msg, internal.FROM_WORKER)


def test_check_refuses_a_missing_field() -> None:
    msg = dict(SAMPLES[internal.STARTED])
    del msg["pid"]
    with pytest.raises(internal.BadMessage):
        internal.check(msg, internal.FROM_WORKER)
