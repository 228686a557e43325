"""What both halves of the suite share: the repository on sys.path, and the root marker.

tests/unit needs no root and no container; tests/system (its own conftest.py) runs real
runc containers and real supervisor processes, and its tests carry the `root` marker, which
skips them without root, runc and busybox.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.harness import wait_for  # noqa: F401 - re-exported

HAVE_ROOT = os.geteuid() == 0 and shutil.which("runc") is not None and shutil.which("busybox") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root, runc and busybox-static")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
