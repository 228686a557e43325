"""The event stream: exec, worker and container events on a PUB socket, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zmq

from warmexec.protocol import Client, codec

from .conftest import Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root


class Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.events: list[dict] = []

    def topic(self, topic: str) -> list[dict]:
        while self.sock.poll(0):
            frame_topic, payload = self.sock.recv_multipart()
            doc = codec.unpack(payload)
            assert frame_topic.decode() == doc["topic"]
            self.events.append(doc)
        return [e for e in self.events if e["topic"] == topic]


def test_event_stream_and_cli(box, container, tmp_path):
    endpoint = f"ipc://{tmp_path}/events.sock"
    sup = Supervisor(box, str(tmp_path), f'events = "{endpoint}"\n')
    sub = Subscriber(endpoint)
    cli = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "events", "--endpoint",
                            endpoint, "--topic", "exec.exited", "--count", "1"],
                           stdout=subprocess.PIPE, text=True)
    cid = None
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)

            def both_subscribed() -> bool:  # subscriptions travel asynchronously
                c.exec(container, ["sh", "-c", "exit 6"])
                return cli.poll() is not None and bool(sub.topic("exec.exited"))
            wait_for(both_subscribed, 15, "both subscribers to see an exec.exited")
            line = json.loads(cli.stdout.readline())
            assert line["topic"] == "exec.exited" and line["exit_code"] == 6
            exited = sub.topic("exec.exited")[-1]
            started = [e for e in sub.topic("exec.started") if e["exec_id"] == exited["exec_id"]][0]
            assert started["pid"] == exited["pid"] and exited["exit_code"] == 6
            assert exited["container"] == container and exited["timings"]["total"] > 0

            cid = box.run("events")
            wait_ready(c, cid)
        added = wait_for(lambda: [e for e in sub.topic("container.added") if e["container"] == cid],
                         5, "container.added")
        assert added[0]["pid"] == box.init_pid(cid)
        states = [e["new"] for e in sub.topic("worker.state") if e["container"] == cid]
        assert states[:2] == ["JOINING", "READY"]
    finally:
        cli.kill()
        sub.sock.close()
        sup.stop()
        if cid:
            box.delete(cid)
