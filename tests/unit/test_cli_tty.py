"""`warmexec exec -it`'s detach keys, docker's syntax and docker's held-back prefix."""

from __future__ import annotations

import pytest

from warmexec.protocol.errors import WarmexecError
from warmexec.supervisor.cli_tty import DEFAULT_DETACH_KEYS, DetachKeys, parse_keys


def test_keys_are_parsed_as_docker_spells_them() -> None:
    assert parse_keys(DEFAULT_DETACH_KEYS) == b"\x10\x11"
    every = "ctrl-a,x,ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_"
    assert parse_keys(every) == b"\x01x\x00\x1b\x1c\x1d\x1e\x1f"
    assert parse_keys("CTRL-Z") == b"\x1a"
    for bad in ("ctrl-", "ctrl-1", "ab", "ctrl-é", ""):
        with pytest.raises(WarmexecError):
            parse_keys(bad)


def test_the_sequence_detaches_and_a_broken_prefix_is_passed_on() -> None:
    keys = DetachKeys(b"\x10\x11")
    assert keys.feed(b"ls\r") == b"ls\r"
    assert keys.feed(b"a\x10") == b"a"  # held: it may begin the sequence
    assert keys.feed(b"b") == b"\x10b"  # it did not
    assert keys.feed(b"\x10") == b""
    assert keys.feed(b"\x11") is None  # across two reads
    assert DetachKeys(b"\x10\x11").feed(b"x\x10\x11y") is None
