"""Docker HEALTHCHECKs run by warmexec (docker_healthchecks = true), beside docker's own.

A private dockerd (bench/dockerbox.py) runs a container with `--health-cmd`; the
supervisor reads the HEALTHCHECK from the engine and runs it as a scheduled probe with
docker's semantics, and its health must follow docker's own through the same changes.
"""

from __future__ import annotations

import pytest

from warmexec.protocol import Client

from .conftest import SupervisorProcess, stop_cleanly, wait_for, wait_ready

pytestmark = pytest.mark.root


def docker_row(sup: SupervisorProcess, cid: str) -> dict | None:
    with Client(sup.endpoint) as c:
        rows = c.call("probes")["probes"]
    return next((r for r in rows if r["container"] == cid and r["probe"] == "docker"), None)


def docker_status(docker, cid: str) -> str | None:
    return (docker.inspect(cid)["State"].get("Health") or {}).get("Status")


def test_a_docker_healthcheck_runs_as_a_warmexec_probe_and_agrees_with_dockers(docker, tmp_path):
    sup = SupervisorProcess(docker.runc_root, str(tmp_path),
                            config=f'docker_host = "{docker.host}"\ndocker_healthchecks = true\n')
    checked = docker.run("hc-checked", "--health-cmd", "cat /tmp/healthy", "--health-interval", "1s",
                         "--health-timeout", "1s", "--health-retries", "2")
    plain = docker.run("hc-plain")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, checked)
            wait_ready(c, plain)
        row = wait_for(lambda: docker_row(sup, checked), 15, "the HEALTHCHECK to become a probe")
        assert row["name"] == "hc-checked" and row["period"] == 1.0
        # docker's own check and ours both see the file missing, then present
        wait_for(lambda: docker_row(sup, checked)["status"] == "unhealthy", 15, "warmexec: unhealthy")
        wait_for(lambda: docker_status(docker, checked) == "unhealthy", 15, "docker: unhealthy")
        last = docker_row(sup, checked)["last"]
        assert last["result"] == "failure" and last["exit_code"] == 1 and "/tmp/healthy" in last["output"]
        assert docker.exec(checked, ["touch", "/tmp/healthy"]).code == 0
        wait_for(lambda: docker_row(sup, checked)["status"] == "healthy", 15, "warmexec: healthy")
        wait_for(lambda: docker_status(docker, checked) == "healthy", 15, "docker: healthy")
        assert docker_row(sup, plain) is None  # no HEALTHCHECK, no probe
    finally:
        docker.remove(checked, plain)
        stop_cleanly(sup)
