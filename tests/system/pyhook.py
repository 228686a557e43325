"""A Python hook for the tests: appends each event as a JSON line to $WARMEXEC_TEST_HOOK_LOG."""

import json
import os


class RecordingHook:
    def _write(self, event: dict) -> None:
        with open(os.environ["WARMEXEC_TEST_HOOK_LOG"], "a") as f:
            f.write(json.dumps(event) + "\n")

    def start(self, event: dict) -> None:
        self._write(event)

    def exit(self, event: dict) -> None:
        self._write(event)
        if event["exit_code"] == 99:
            raise RuntimeError("a hook's own bug must not reach the client")
