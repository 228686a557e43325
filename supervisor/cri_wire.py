"""The few CRI messages ``warmexec cri`` reads or writes, as protobuf bytes.

Everything else passes through the proxy as it came; these are decoded by hand (field
numbers of ``runtime.v1``'s api.proto), so that the fast path needs no generated code
and touches only the fields it uses: ExecSyncRequest and ExecSyncResponse, and the
runtime's name in VersionResponse (which runtime is upstream).
"""

from __future__ import annotations

from collections.abc import Iterator


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field; unknown ones are the caller's to skip."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated field")
            value, i = data[i:i + size], i + size
        elif kind == 1:
            value, i = data[i:i + 8], i + 8
        elif kind == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {kind}")
        yield number, kind, value


def decode_exec_sync_request(data: bytes) -> tuple[str, list[str], int]:
    """ExecSyncRequest: container_id = 1, repeated cmd = 2, timeout (seconds) = 3."""
    cid, cmd, timeout = "", [], 0
    for number, kind, value in fields(data):
        if number == 1 and kind == 2:
            cid = value.decode()
        elif number == 2 and kind == 2:
            cmd.append(value.decode())
        elif number == 3 and kind == 0:
            timeout = value - (1 << 64) if value >= 1 << 63 else value
    return cid, cmd, timeout


def decode_runtime_name(data: bytes) -> str:
    """VersionResponse: version = 1, runtime_name = 2 ("containerd", "cri-o"), ..."""
    for number, kind, value in fields(data):
        if number == 2 and kind == 2:
            return value.decode(errors="replace")
    return ""


def _put_varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_exec_sync_response(stdout: bytes, stderr: bytes, exit_code: int) -> bytes:
    """ExecSyncResponse: stdout = 1, stderr = 2, exit_code = 3 (int32; proto3 leaves out
    what is empty or zero)."""
    out = bytearray()
    for number, data in ((1, stdout), (2, stderr)):
        if data:
            out += _put_varint(number << 3 | 2) + _put_varint(len(data)) + data
    if exit_code:
        out += _put_varint(3 << 3) + _put_varint(exit_code)
    return bytes(out)
