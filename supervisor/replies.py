"""Replies larger than a few KiB, bounded in bytes per client (see ReplyBudget)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import zmq

REPLY_BUDGET = 8 << 20  # bytes of larger replies zmq may hold for one client
TRACKED_COST = 1 << 10  # what the ledger charges a large reply beyond its bytes (its tracker)
FLUSH_INTERVAL = 0.01  # seconds between sends of replies waiting for room
SWEEP_INTERVAL = 1.0  # seconds: how soon the ledger forgets clients that went away
SENT, WAITING, DROPPED = "sent", "waiting", "dropped"  # what became of a large reply


class _Peer:
    """One client's large replies: those zmq holds (in the order it writes them) and
    those waiting for room."""

    __slots__ = ("held", "sent", "waiting", "waiting_bytes")

    def __init__(self) -> None:
        self.held = 0
        self.sent: deque[tuple[int, zmq.MessageTracker]] = deque()
        self.waiting: deque[tuple[list[bytes], bytes, int]] = deque()
        self.waiting_bytes = 0


class ReplyBudget:
    """Large replies, bounded in bytes per client: REPLY_BUDGET in ZeroMQ's queues, as
    much again waiting here for room; past both a reply is dropped (and the caller counts
    it REPLY_DROPPED).

    A ROUTER bounds what it queues for a peer in messages (SNDHWM), not bytes, and says
    nothing of how much of it the peer has taken. So a reply over SMALL_REPLY is sent
    zero-copy with a pyzmq MessageTracker: libzmq holds our own bytes object instead of a
    copy and lets go of it once it has written its last byte into the client's connection
    (or dropped it with the connection), when pyzmq's garbage-collector thread marks the
    tracker done. The ledger is thus exact about what a client pins, not an estimate;
    zmq writes one peer's messages in order, so they are released in order.

    A client that reads keeps its ledger near zero (its zmq I/O thread empties the
    connection even while its application is busy, up to its own RCVHWM), but the
    tracker is marked done by a Python thread, which waits for the GIL while the loop is
    busy: in a burst the ledger lags behind zmq. The waiting queue absorbs that lag
    (``flush`` sends what fits, every FLUSH_INTERVAL while anything waits) instead of
    dropping replies a reading client would have taken. A client that stops reading fills
    both, and what it is sent after that is dropped.

    What one client (one connection: ZeroMQ's peer) can pin in all: SNDHWM small
    replies, each at most SMALL_REPLY plus its envelope (MAX_ENVELOPE), and twice
    REPLY_BUDGET of large ones with their trackers: about 24 MiB. A client with many
    connections has as many budgets: the IPC endpoint is root's alone, a TCP one needs an
    authorised key.
    """

    def __init__(self, send: Callable[[list[bytes], bytes], zmq.MessageTracker | None],
                 budget: int = REPLY_BUDGET) -> None:
        self.send = send  # sends one reply tracked; None if it could not be sent
        self.budget = budget
        self.peers: dict[bytes, _Peer] = {}

    def offer(self, envelope: list[bytes], data: bytes) -> str:
        """Send now (SENT), or queue until there is room (WAITING), or DROPPED: no room."""
        key = envelope[0]
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = _Peer()
        size = len(data) + sum(map(len, envelope)) + TRACKED_COST
        if not peer.waiting and self._fits(peer, size):
            self._send(peer, envelope, data, size)
            outcome = SENT
        elif peer.waiting_bytes + size <= self.budget:
            peer.waiting.append((envelope, data, size))
            peer.waiting_bytes += size
            outcome = WAITING
        else:
            outcome = DROPPED
        self._forget_if_empty(key, peer)
        return outcome

    def room_for(self, envelope: list[bytes], data: bytes) -> int:
        """For a stream's output: the bytes data costs if it fits this client's budget
        now (none of its replies waiting), else 0: the stream holds it and reads no more
        until it goes. Output and large replies share the one budget."""
        peer = self.peers.get(envelope[0])
        size = len(data) + sum(map(len, envelope)) + TRACKED_COST
        if peer is None:
            return size
        return size if not peer.waiting and self._fits(peer, size) else 0

    def held(self, envelope: list[bytes], size: int, tracker: zmq.MessageTracker) -> None:
        """A stream's output that went out tracked (room_for said it fits)."""
        peer = self.peers.get(envelope[0])
        if peer is None:
            peer = self.peers[envelope[0]] = _Peer()
        peer.sent.append((size, tracker))
        peer.held += size

    def flush(self) -> float | None:
        """Release what zmq let go of, send what now fits, forget clients with nothing
        left (a client that went away is never offered a reply again). Return the
        seconds until the next flush is due, or None when nothing is held."""
        for key, peer in list(self.peers.items()):
            self._release(peer)
            while peer.waiting and self._fits(peer, peer.waiting[0][2]):
                envelope, data, size = peer.waiting.popleft()
                peer.waiting_bytes -= size
                self._send(peer, envelope, data, size)
            self._forget_if_empty(key, peer)
        if any(peer.waiting for peer in self.peers.values()):
            return FLUSH_INTERVAL
        return SWEEP_INTERVAL if self.peers else None

    def _fits(self, peer: _Peer, size: int) -> bool:
        """One reply always fits, however large; the rest within the budget."""
        self._release(peer)
        return peer.held == 0 or peer.held + size <= self.budget

    def _release(self, peer: _Peer) -> None:
        while peer.sent and peer.sent[0][1].done:
            peer.held -= peer.sent.popleft()[0]

    def _send(self, peer: _Peer, envelope: list[bytes], data: bytes, size: int) -> None:
        tracker = self.send(envelope, data)
        if tracker is not None:
            peer.sent.append((size, tracker))
            peer.held += size

    def _forget_if_empty(self, key: bytes, peer: _Peer) -> None:
        if not peer.sent and not peer.waiting:
            self.peers.pop(key, None)
