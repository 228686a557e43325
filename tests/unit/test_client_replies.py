"""The Python client reads replies as large as the protocol allows (two streams of up
to 16 MiB each), not only requests' 4 MiB: a ROUTER of the test's stands in for the
supervisor."""

from __future__ import annotations

import tempfile
import threading

import zmq

from warmexec.protocol import codec
from warmexec.protocol.client import Client


def test_a_reply_with_16_mib_of_each_stream_is_read():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='we-client-')}/sup.sock"
    router.bind(endpoint)
    out = b"o" * (16 << 20)

    def answer() -> None:
        peer, data = router.recv_multipart()
        req = codec.unpack_map(data)
        router.send_multipart([peer, codec.pack({"v": 1, "id": req["id"], "ok": True, "exit_code": 0,
                                                 "stdout": out, "stderr": out})])
    t = threading.Thread(target=answer)
    t.start()
    try:
        with Client(endpoint, context=ctx) as c:
            r = c.exec("c1", ["true"], capture=16 << 20, timeout=10)
        assert r["stdout"] == out and r["stderr"] == out
    finally:
        t.join(10)
        router.close(0)
        ctx.term()
