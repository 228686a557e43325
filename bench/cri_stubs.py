"""Python stubs of the CRI subset in tests/cri/runtime_subset.proto, generated on first use.

``grpc_tools.protoc`` (the test extra's grpcio-tools) compiles the proto into a temp
dir, the two modules are imported from there under their generated names and the dir
is removed: nothing generated is kept or committed. ``load()`` returns a namespace with
``pb`` (messages: ``pb.ExecSyncRequest``...) and ``rpc`` (``rpc.RuntimeServiceStub``,
``rpc.ImageServiceStub``, the servicer bases and ``add_*_to_server``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import types

PROTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "cri",
                     "runtime_subset.proto")
# The largest message a CRI client here accepts or sends: ExecSync's two 16 MiB streams
# and some framing. grpc's own default (4 MiB receive) would hide what a runtime sends.
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE))

_loaded: types.SimpleNamespace | None = None


class StubsUnavailable(Exception):
    """grpcio or grpcio-tools is missing, or the proto does not compile; the message says why."""


def load() -> types.SimpleNamespace:
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        import grpc  # noqa: F401 - the generated service module needs it
        from grpc_tools import protoc
    except ImportError as exc:
        raise StubsUnavailable(f"{exc.name} is not installed (pip install grpcio grpcio-tools)") from exc
    out = tempfile.mkdtemp(prefix="cri-stubs-")
    try:
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")  # protobuf's own .protos
        args = ["protoc", f"-I{os.path.dirname(PROTO)}", f"-I{include}", f"--python_out={out}",
                f"--grpc_python_out={out}", os.path.basename(PROTO)]
        if protoc.main(args) != 0:
            raise StubsUnavailable(f"protoc failed on {PROTO}")
        pb = _import(out, "runtime_subset_pb2")
        rpc = _import(out, "runtime_subset_pb2_grpc")  # imports runtime_subset_pb2 by that name
    finally:
        shutil.rmtree(out, ignore_errors=True)
    _loaded = types.SimpleNamespace(pb=pb, rpc=rpc)
    return _loaded


def _import(directory: str, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def channel(target: str):
    """A grpc channel to a CRI endpoint (``unix:///path`` or ``host:port``) with message
    limits above ExecSync's."""
    import grpc

    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
