"""The only place warmexec calls msgpack.

Everything that crosses a process boundary (the ZeroMQ wire and the supervisor's
socketpairs with its workers) is one msgpack map per message. Untrusted input is
bounded here: the frame size is checked before decoding and msgpack's own limits cap
every container and string, so a hostile frame costs at most ``max_size`` bytes of
work and can only ever raise :class:`ProtocolError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

#: Largest frame accepted from a client (also set as ZMQ_MAXMSGSIZE on the socket).
MAX_MESSAGE = 4 << 20


class ProtocolError(Exception):
    """A frame that is not a valid warmexec message. Carries a stable error code."""

    def __init__(self, message: str, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_size: int = MAX_MESSAGE) -> Any:
    """Decode one frame; any failure is a ProtocolError, never another exception."""
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=65536,
            max_map_len=65536,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except Exception as exc:  # msgpack raises many types; the wire has one error.
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from None


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("msgpack ext types are not part of the protocol")


def unpack_map(data: bytes, max_size: int = MAX_MESSAGE) -> dict:
    obj = unpack(data, max_size)
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a map, got {type(obj).__name__}")
    return obj
