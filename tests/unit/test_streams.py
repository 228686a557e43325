"""Streamed execs' wire (protocol/streams.py) and their bounded records (supervisor/records.py)."""

from __future__ import annotations

import pytest

from warmexec.protocol import errors, messages, streams
from warmexec.protocol.errors import WarmexecError
from warmexec.supervisor.execs import Exec
from warmexec.supervisor.records import Records


def _exec(**fields):
    return messages.parse_exec({"container": "c", "argv": ["cat"], **fields})


def test_a_one_shot_exec_has_no_stream_and_keeps_its_capture():
    req = _exec()
    assert req.stream is None and req.capture == messages.DEFAULT_CAPTURE


def test_stream_options_and_their_bounds():
    req = _exec(stream=True, interactive=True, window=4096, grace=2)
    assert req.stream.interactive and req.stream.window == 4096 and req.stream.grace == 2.0
    assert req.capture == 0  # its output goes to the client
    for bad in ({"interactive": True}, {"detach": True},  # need stream: true
                {"stream": True, "stdin": b"x"}, {"stream": True, "window": streams.MAX_WINDOW + 1},
                {"stream": True, "grace": 0}, {"stream": True, "grace": True}, {"stream": 1},
                {"tty": True}, {"stream": True, "tty": 1}, {"stream": True, "tty": True, "rows": 0},
                {"stream": True, "tty": True, "cols": 65536}):
        with pytest.raises(WarmexecError) as e:
            _exec(**bad)
        assert e.value.code == errors.BAD_REQUEST, bad


def test_a_terminal_takes_its_size():
    req = _exec(stream=True, tty=True, interactive=True, rows=33, cols=111)
    assert req.stream.tty and (req.stream.rows, req.stream.cols) == (33, 111)
    assert streams.parse_stream("resize", {"exec_id": 3, "rows": 40, "cols": 120}).cols == 120


def test_stream_requests_are_parsed_strictly():
    assert streams.parse_stream("credit", {"exec_id": 3, "bytes": 10}).bytes == 10
    assert streams.parse_stream("signal", {"exec_id": 3, "signal": "term"}).signal == 15
    assert streams.parse_stream("signal", {"exec_id": 3, "signal": "SIGKILL"}).signal == 9
    assert streams.parse_stream("stdin", {"exec_id": 3, "data": b"x", "eof": True}).eof
    for op, req in (("credit", {"exec_id": 0}), ("credit", {"exec_id": True}),
                    ("credit", {"exec_id": 1, "bytes": streams.MAX_WINDOW + 1}),
                    ("stdin", {"exec_id": 1, "data": "text"}),
                    ("stdin", {"exec_id": 1, "data": b"x" * (streams.MAX_STDIN_CHUNK + 1)}),
                    ("signal", {"exec_id": 1, "signal": "NOPE"}), ("signal", {"exec_id": 1, "signal": 0}),
                    ("signal", {"exec_id": 1, "signal": "KILL;x"})):
        with pytest.raises(WarmexecError) as e:
            streams.parse_stream(op, req)
        assert e.value.code == errors.BAD_REQUEST, (op, req)


def test_finished_records_are_bounded_in_number():
    records = Records(keep=3)
    exits = []
    for _ in range(5):
        ex = Exec([b"peer"], 1, _exec(stream=True))
        records.started(ex)
        records.finished_exec(ex, messages.ok_reply(1, exit_code=0, signal=None, timed_out=False,
                                                    oom_killed=False))
        exits.append(ex.exec_id)
    assert [records.finished(i) for i in exits] == [False, False, True, True, True]
    with pytest.raises(WarmexecError) as e:
        records.inspect(1, exits[0])
    assert e.value.code == errors.NO_SUCH_EXEC
    assert records.inspect(1, exits[-1])["exit_code"] == 0


def test_finished_records_are_bounded_in_time():
    records = Records(keep_for=0.0)
    ex = Exec([b"peer"], 1, _exec(stream=True))
    records.started(ex)
    assert records.inspect(1, ex.exec_id)["running"] is True
    records.finished_exec(ex, messages.error_reply(1, errors.CLIENT_GONE, "gone"))
    with pytest.raises(WarmexecError):
        records.inspect(1, ex.exec_id)
