"""The one-way doors between warmexec's three packages, checked on the source AST.

protocol/ is a leaf (stdlib + msgpack; pyzmq in client.py alone); supervisor/ may use
protocol/; worker/ may use protocol/ but stays small: no pyzmq, prometheus or psutil.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "supervisor", "worker")
HEAVY = {"zmq", "prometheus_client", "psutil"}


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources found in {package}/"
    return files


def _imports(path: Path, package: str) -> set[str]:
    """Absolute dotted names of every module `path` imports (anywhere in the file).

    Relative imports are resolved against the installed layout ``warmexec.<package>``.
    """
    rel_parts = path.relative_to(REPO / package).with_suffix("").parts
    # The package a relative import starts from: the module's own package (for an
    # __init__.py that is the package it defines, for a plain module its container).
    here = ["warmexec", package, *rel_parts][:-1]
    return _imports_of(path.read_text(encoding="utf-8"), here, str(path))


def _imports_of(source: str, here: list[str], filename: str = "<src>") -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # `from .. import supervisor` names a module in `names`.
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def _hits(names: set[str], forbidden_package: str) -> list[str]:
    target = f"warmexec.{forbidden_package}"
    return sorted(n for n in names
                  if n == target or n.startswith(target + ".")
                  or n == forbidden_package or n.startswith(forbidden_package + "."))


def _all_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p, package) for p in _files(package)}


def test_import_resolution_on_synthetic_source():
    src = """
import os, zmq.asyncio
from . import creds
from .users import resolve
from .. import supervisor
from ..supervisor.status import decode
from warmexec.supervisor import server

def late():
    import prometheus_client
    from psutil import Process
"""
    names = _imports_of(src, ["warmexec", "worker"])
    assert {"os", "zmq.asyncio", "warmexec.worker.creds", "warmexec.worker.users",
            "warmexec.supervisor", "warmexec.supervisor.status", "prometheus_client",
            "psutil"} <= names
    assert _hits(names, "supervisor") == ["warmexec.supervisor", "warmexec.supervisor.server",
                                          "warmexec.supervisor.status",
                                          "warmexec.supervisor.status.decode"]
    assert "warmexec.worker.users.resolve" in _hits(names, "worker")
    assert {_top(n) for n in names} & HEAVY == HEAVY


def test_import_resolution_on_repo_sources():
    # Guard the helper itself on the shapes used in this repo.
    src = REPO / "worker" / "linux.py"
    assert "warmexec.protocol.caps" in _imports(src, "worker")
    assert "warmexec.protocol.ipc" in _imports(REPO / "worker" / "worker.py", "worker")
    assert "warmexec.worker.creds" in _imports(REPO / "worker" / "worker.py", "worker")
    assert "zmq" in _imports(REPO / "protocol" / "client.py", "protocol")


@pytest.mark.parametrize("forbidden", ["supervisor", "worker"])
def test_protocol_imports_neither_supervisor_nor_worker(forbidden):
    bad = {f: _hits(names, forbidden) for f, names in _all_imports("protocol").items()}
    assert not {f: h for f, h in bad.items() if h}


def test_supervisor_never_imports_worker():
    bad = {f: _hits(names, "worker") for f, names in _all_imports("supervisor").items()}
    assert not {f: h for f, h in bad.items() if h}


def test_worker_never_imports_supervisor():
    bad = {f: _hits(names, "supervisor") for f, names in _all_imports("worker").items()}
    assert not {f: h for f, h in bad.items() if h}


def test_worker_imports_no_heavy_dependency():
    bad = {f: sorted(n for n in names if _top(n) in HEAVY)
           for f, names in _all_imports("worker").items()}
    assert not {f: h for f, h in bad.items() if h}


def test_protocol_imports_no_heavy_dependency_except_client_zmq():
    bad = {}
    for f, names in _all_imports("protocol").items():
        clients = (os.path.join("protocol", "client.py"), os.path.join("protocol", "aio_client.py"))
        allowed = {"zmq"} if f in clients else set()
        hits = sorted(n for n in names if _top(n) in HEAVY and _top(n) not in allowed)
        if hits:
            bad[f] = hits
    assert not bad


def test_zygote_import_loads_no_zmq_or_prometheus(tmp_path):
    code = ("import sys, warmexec.worker.zygote, warmexec.worker.worker, warmexec.worker.join\n"
            "heavy = sorted(m for m in sys.modules\n"
            "               if m.split('.')[0] in ('zmq', 'prometheus_client', 'psutil'))\n"
            "print(','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"worker import loaded: {proc.stdout.strip()}"
