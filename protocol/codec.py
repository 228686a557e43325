"""The only place warmexec calls msgpack.

Everything that crosses a process boundary (the ZeroMQ wire and the supervisor's
socketpairs with its workers) is one msgpack map per message. Untrusted input is
bounded here: the frame size is checked before decoding and msgpack's own limits cap
every container and string, so a hostile frame costs at most ``max_size`` bytes of
work and can only ever raise :class:`ProtocolError`. What the supervisor echoes back
(the request id) is bounded again, far lower, with :func:`encoded_size`.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import msgpack

#: Largest frame accepted from a client (also set as ZMQ_MAXMSGSIZE on the socket).
MAX_MESSAGE = 4 << 20
_SCALAR_SIZE = 9  # the most msgpack takes for nil, a bool, an int or a float
_HEADER_SIZE = 5  # the most a str, bin, array or map header takes


class ProtocolError(Exception):
    """A frame that is not a valid warmexec message. Carries a stable error code."""

    def __init__(self, message: str, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_size: int = MAX_MESSAGE, max_str_len: int | None = None,
           max_array_len: int = 65536, max_map_len: int = 65536) -> Any:
    """Decode one frame; any failure is a ProtocolError, never another exception."""
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_size if max_str_len is None else max_str_len,
            max_bin_len=max_size,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except Exception as exc:  # msgpack raises many types; the wire has one error.
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from None


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("msgpack ext types are not part of the protocol")


def unpack_map(data: bytes, max_size: int = MAX_MESSAGE, **limits: int) -> dict:
    obj = unpack(data, max_size, **limits)
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a map, got {type(obj).__name__}")
    return obj


class _TooLarge(Exception):
    pass


def encoded_size(value: Any, limit: int, depth: int) -> int | None:
    """The bytes msgpack takes for a decoded value, or None when that is over ``limit``
    or the value nests more than ``depth`` arrays or maps.

    Computed without packing (a 4 MiB value would cost a 4 MiB copy to measure), and
    stopping as soon as the limit is passed: each element costs at least one byte, so
    the walk is bounded by ``limit`` whatever the value holds."""
    try:
        return _size(value, limit, depth)
    except _TooLarge:
        return None


def _size(value: Any, left: int, depth: int) -> int:
    if value is None or isinstance(value, bool):
        n = 1
    elif isinstance(value, int):
        n = _int_size(value)
    elif isinstance(value, float):
        n = 9  # packed as a float 64
    elif isinstance(value, bytes):
        n = _header(len(value), 0, 1 << 8) + len(value)
    elif isinstance(value, str):
        if len(value) > left:  # before encoding it: a character is at least one byte
            raise _TooLarge
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        n = _header(size, 32, 1 << 8) + size
    elif isinstance(value, (list, tuple, dict)) and depth > 0:
        n = _header(len(value), 16, 0)
        for item in chain.from_iterable(value.items()) if isinstance(value, dict) else value:
            n += _size(item, left - n, depth - 1)
    else:
        raise _TooLarge  # too deep, or not a type the decoder makes
    if n > left:
        raise _TooLarge
    return n


def _header(length: int, fix: int, short: int) -> int:
    """A str, bin, array or map header: fixed (1 byte, under ``fix``), 8-bit (under
    ``short``), 16-bit or 32-bit length."""
    if length < fix:
        return 1
    return 2 if length < short else 3 if length < 1 << 16 else 5


def _int_size(v: int) -> int:
    if -32 <= v < 128:
        return 1
    for n, lo, hi in ((2, -(1 << 7), 1 << 8), (3, -(1 << 15), 1 << 16), (5, -(1 << 31), 1 << 32)):
        if lo <= v < hi:
            return n
    return 9
