"""The CRI front end's own parts, without a runtime: ExecSync's protobuf, and forwarding
every other call to an upstream as it is (a small gRPC server of the test's stands in
for containerd; the system tests use a real one)."""

from __future__ import annotations

import asyncio
import tempfile

import grpc
import pytest

from warmexec.supervisor import cri, cri_runtimes


def test_exec_sync_request_decodes_as_protobuf_encodes_it():
    # container_id="c1", cmd=["sh", "-c", "true"], timeout=5, plus an unknown field 9
    data = (b"\x0a\x02c1" + b"\x12\x02sh" + b"\x12\x02-c" + b"\x12\x04true" + b"\x18\x05" + b"\x4a\x01x")
    assert cri.decode_exec_sync_request(data) == ("c1", ["sh", "-c", "true"], 5)
    assert cri.decode_exec_sync_request(b"") == ("", [], 0)
    with pytest.raises(ValueError):
        cri.decode_exec_sync_request(b"\x0a\x09c1")  # a length past the end


def test_exec_sync_response_encoding():
    assert cri.encode_exec_sync_response(b"", b"", 0) == b""
    assert cri.encode_exec_sync_response(b"out", b"", 3) == b"\x0a\x03out\x18\x03"
    big = b"x" * 300
    assert cri.encode_exec_sync_response(big, b"e", 0) == b"\x0a\xac\x02" + big + b"\x12\x01e"
    assert cri.encode_exec_sync_response(b"", b"", -1) == b"\x18" + b"\xff" * 9 + b"\x01"  # int32 -1


def test_timeouts_are_spelled_as_go_spells_durations():
    assert [cri_runtimes.go_duration(n) for n in (1, 59, 60, 90, 3600, 3661)] == \
        ["1s", "59s", "1m0s", "1m30s", "1h0m0s", "1h1m1s"]


class Upstream(grpc.GenericRpcHandler):
    """Echoes requests with the metadata it got; /x.Fail/Now fails with details and trailers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def service(self, details):
        method = details.method
        if method == "/x.Fail/Now":
            async def fail(request, context):
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing",
                                    (("why-bin", b"\x00\x01"),))
            return grpc.unary_unary_rpc_method_handler(fail)

        async def echo(requests, context):
            self.seen.append((method, dict(context.invocation_metadata()), context.time_remaining()))
            await context.send_initial_metadata((("up-initial", "1"),))
            async for request in requests:
                yield request + b"!"
            context.set_trailing_metadata((("up-trailer", "2"),))
        return grpc.stream_stream_rpc_method_handler(echo)


async def _through_proxy(check, endpoint: str | None = None) -> None:
    d = tempfile.mkdtemp(prefix="we-cri-")
    upstream_sock, proxy_sock = f"unix://{d}/up.sock", f"unix://{d}/proxy.sock"
    fake = Upstream()
    up = grpc.aio.server()
    up.add_generic_rpc_handlers((fake,))
    up.add_insecure_port(upstream_sock)
    await up.start()
    channel = grpc.aio.insecure_channel(upstream_sock)
    proxy = cri.Proxy(channel, endpoint=endpoint)
    if endpoint is None:
        async def unknown(cid: str) -> str:
            return "unknown_container"
        proxy.served.why_not = unknown  # no supervisor here: every ExecSync is forwarded
    front = grpc.aio.server()
    front.add_generic_rpc_handlers((proxy,))
    front.add_insecure_port(proxy_sock)
    await front.start()
    try:
        async with grpc.aio.insecure_channel(proxy_sock) as client:
            await check(client, fake)
    finally:
        await front.stop(0)
        await up.stop(0)
        await channel.close()
        proxy.supervisor.close()


def test_unknown_and_streaming_methods_are_forwarded_with_metadata_and_trailers():
    async def check(client, fake):
        call = client.unary_unary("/runtime.v1.RuntimeService/Version")(
            b"req", metadata=(("who", "kubelet"),), timeout=5)
        assert await call == b"req!"
        assert ("up-initial", "1") in tuple(await call.initial_metadata())
        assert ("up-trailer", "2") in tuple(await call.trailing_metadata())
        stream = client.stream_stream("/future.v9.Service/Chat")(iter([b"a", b"b", b"c"]), timeout=5)
        assert [r async for r in stream] == [b"a!", b"b!", b"c!"]
        method, md, left = fake.seen[0]
        assert method == "/runtime.v1.RuntimeService/Version" and md.get("who") == "kubelet"
        # the caller's deadline reached the upstream (gRPC rounds a timeout on the wire up a little)
        assert left is not None and 0 < left <= 5.1
    asyncio.run(_through_proxy(check))


def test_an_upstream_error_comes_back_with_its_code_details_and_trailers():
    async def check(client, fake):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.unary_unary("/x.Fail/Now")(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "no such thing"
        assert ("why-bin", b"\x00\x01") in tuple(e.value.trailing_metadata())
    asyncio.run(_through_proxy(check))


def test_exec_sync_for_a_container_warmexec_does_not_serve_goes_to_the_runtime():
    async def check(client, fake):
        request = b"\x0a\x02c9\x12\x04true"
        assert await client.unary_unary(cri.EXEC_SYNC)(request, timeout=5) == request + b"!"
        assert fake.seen[-1][0] == cri.EXEC_SYNC
    asyncio.run(_through_proxy(check))


def test_with_the_supervisor_down_exec_sync_goes_to_the_runtime_at_once():
    """Never worse than the runtime: no supervisor answers at this endpoint."""
    async def check(client, fake):
        request = b"\x0a\x02c9\x12\x04true"
        for _ in range(3):  # the first waits for the list's timeout; the next ones know
            assert await client.unary_unary(cri.EXEC_SYNC)(request, timeout=5) == request + b"!"
    d = tempfile.mkdtemp(prefix="we-cri-")
    asyncio.run(_through_proxy(check, endpoint=f"ipc://{d}/no-supervisor.sock"))


def test_a_bad_metrics_address_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", "cri", "--listen",
                        f"unix://{tmp_path}/cri.sock", "--upstream", f"unix://{tmp_path}/up.sock",
                        "--metrics-addr", "127.0.0.1:nope"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "warmexec cri: cannot serve metrics on '127.0.0.1:nope'" in r.stderr
    assert "Traceback" not in r.stderr
