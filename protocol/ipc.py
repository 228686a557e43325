"""Messages between the supervisor and its zygote, joiners and workers.

Each message is one msgpack map in one AF_UNIX SOCK_SEQPACKET datagram, optionally
carrying file descriptors (SCM_RIGHTS): an exec's stdin pipe going down; a worker's
socket, a pidfd of a joiner, worker or command coming up. SEQPACKET keeps message boundaries and, unlike a
path-based socket, keeps working after the worker has joined another mount namespace.

Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC), so nothing received here
can leak into a process that a worker later executes. Descriptors that do not fit
the receiver's fd limit are dropped by the kernel (MSG_CTRUNC): a message that must
carry one says so in a field, and the receiver checks.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Sequence

from .codec import ProtocolError, pack, unpack_map

MAX_IPC = (4 << 20) + 1024
MAX_FDS = 8
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A SEQPACKET pair whose datagrams may be as large as any message (a datagram must
    fit the sender's buffer, 208 KiB by default): an exec's argv and env may be MiBs.
    The buffer is a limit, not an allocation."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in pair:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_IPC)  # past wmem_max: root
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_IPC)  # up to wmem_max
    return pair


def send(sock: socket.socket, msg: dict, fds: Sequence[int] = ()) -> None:
    data = pack(msg)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def encode(msg: dict) -> bytes:
    return pack(msg)


def send_nowait(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> bool:
    """Send one encoded message if the socket takes it now; False if it would block.
    Other errors (the peer is gone) raise OSError."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sock.sendmsg([data], anc, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    return True


_buffer: list[mmap.mmap] = []


def _receive_buffer() -> mmap.mmap:
    """This process's receive buffer, made on first use: MAX_IPC bytes of private
    anonymous memory that become resident only as far as messages reach into them
    (recvmsg with a MAX_IPC-byte size would map, shrink and unmap that much per
    message). Private, so a forked child writes to its own copy."""
    if not _buffer:
        _buffer.append(mmap.mmap(-1, MAX_IPC, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    return _buffer[0]


#: What a worker may send in one message: the largest is an "exited" with up to a
#: chunk of output (96 KiB) and a few small fields; no arrays, no deep maps. A worker is
#: a process of its container, so its messages are decoded within these bounds.
FROM_WORKER = {"max_size": 128 << 10, "max_str_len": 4096, "max_array_len": 0, "max_map_len": 32}


class Malformed(Exception):
    """An undecodable message; ``fds`` came with it and are the caller's to let go of
    (a descriptor of the peer's choosing may not be safe to close just anywhere)."""

    def __init__(self, fds: list[int], reason: str) -> None:
        super().__init__(reason)
        self.fds = fds


def recv(sock: socket.socket, limits: dict | None = None) -> tuple[dict | None, list[int]]:
    """Return (message, fds); (None, []) at end of stream (the peer is gone). With
    limits (FROM_WORKER), an undecodable message raises Malformed with its fds."""
    buf = _receive_buffer()
    try:
        n, anc, _, _ = sock.recvmsg_into((buf,), _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        # The peer died with our messages unread: the kernel reports that once, ahead
        # of what the peer had sent us before dying (say, why it failed). Read on.
        try:
            n, anc, _, _ = sock.recvmsg_into((buf,), _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            return None, []
    data = buf[:n]
    if n > 65536:  # a rare large message: do not keep its pages resident for good
        buf.madvise(mmap.MADV_DONTNEED, 0, n)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data:
        for fd in fds:
            _close(fd)
        return None, []
    try:
        return (unpack_map(data, MAX_IPC) if limits is None else unpack_map(data, **limits)), fds
    except ProtocolError as exc:
        if limits is None:
            for fd in fds:
                _close(fd)
            raise
        raise Malformed(fds, exc.message) from None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
