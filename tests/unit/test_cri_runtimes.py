"""How warmexec cri words its answers for each runtime (no root, no runtime): CRI-O's
cannot be installed here, so its path is checked against what its code does
(supervisor/cri_runtimes.py says where), containerd's is also checked against a real
containerd in tests/system/test_cri_parity.py."""

from __future__ import annotations

import grpc
import pytest

from warmexec.supervisor import cri_runtimes as rt
from warmexec.supervisor import cri_wire

MiB = 1 << 20


def decode(response: bytes) -> tuple[bytes, bytes, int]:
    out = {1: b"", 2: b"", 3: 0}
    for number, _, value in cri_wire.fields(response):
        out[number] = value
    return out[1], out[2], out[3] - (1 << 64) if out[3] >= 1 << 63 else out[3]


def test_the_kind_comes_from_the_runtime_s_name():
    assert [rt.kind_of(n) for n in ("cri-o", "CRI-O", "containerd", "", "other")] == \
        [rt.CRIO, rt.CRIO, rt.CONTAINERD, rt.CONTAINERD, rt.CONTAINERD]
    # VersionResponse{version: "0.1.0", runtime_name: "cri-o", runtime_version: "1.31.0"}
    assert cri_wire.decode_runtime_name(b"\x0a\x050.1.0\x12\x05cri-o\x1a\x061.31.0") == "cri-o"
    assert cri_wire.decode_runtime_name(b"") == ""


def test_a_timeout_behind_cri_o_is_an_answer_with_exit_code_minus_one():
    assert decode(rt.timed_out(rt.CRIO, 1)) == (b"", b"command timed out", -1)


def test_a_timeout_behind_containerd_is_deadline_exceeded_with_its_go_duration():
    with pytest.raises(rt.Refusal) as e:
        rt.timed_out(rt.CONTAINERD, 90)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert e.value.details == "failed to exec in container: timeout 1m30s exceeded: context deadline exceeded"


def test_containerd_refuses_a_reply_over_16_mib_and_cri_o_caps_its_log_instead():
    out = b"x" * (16 * MiB)
    with pytest.raises(rt.Refusal) as e:
        rt.exited(rt.CONTAINERD, out, b"", 0)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details == "grpc: trying to send message larger than max (16777221 vs. 16777216)"
    assert decode(rt.exited(rt.CONTAINERD, b"ok\n", b"", 3)) == (b"ok\n", b"", 3)
    got, err, code = decode(rt.exited(rt.CRIO, out, b"err\n", 0))
    assert len(got) < 16 * MiB and (err, code) == (b"", 0)


def test_small_output_is_cri_o_s_as_it_is():
    assert rt.crio_output(b"a\nb\n", b"c") == (b"a\nb\n", b"c")
    assert rt.crio_output(b"", b"") == (b"", b"")


def test_cri_o_keeps_what_its_16_mib_exec_log_holds():
    # One line of 16 MiB: conmon logs it in 8 KiB pieces, each 45 + 8192 bytes and a newline.
    pieces, rest = divmod(16 * MiB, 45 + 8192 + 1)
    out, err = rt.crio_output(b"x" * (16 * MiB), b"e\n")
    assert (len(out), err) == (pieces * 8192 + rest - 45, b"")
    # Lines of 100 bytes: each costs 145 in the log; stderr gets what stdout leaves.
    lines = (16 * MiB) // 145 - 10
    out, err = rt.crio_output((b"y" * 99 + b"\n") * lines, (b"z" * 99 + b"\n") * 20)
    assert out == (b"y" * 99 + b"\n") * lines
    left = 16 * MiB - lines * 145
    whole, cut = divmod(left, 145)
    assert err == ((b"z" * 99 + b"\n") * 20)[:whole * 100 + max(0, cut - 45)]


def test_the_log_size_estimate_never_exceeds_the_log():
    """The fast path returns the streams unwalked only when even the smallest log they
    could make fits: the estimate must not be above the log _keep walks."""
    for data in (b"x" * 20000, b"a\n" * 5000, b"x" * 8192 + b"\n" + b"y" * 10, b"\n"):
        kept, left = rt._keep(data, 1 << 40)
        assert kept == data and (1 << 40) - left <= rt._log_size(data)
