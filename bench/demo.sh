#!/usr/bin/env bash
# The main job: set up (see setup.sh), start a demo busybox container under runc and
# the warmexec supervisor, run execs through it and show their latency beside runc exec's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
exec .venv/bin/python -m bench.demo "$@"
