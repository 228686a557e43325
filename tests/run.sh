#!/usr/bin/env bash
# The test command: set up (see setup.sh), then run the whole suite against real runc
# containers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
exec .venv/bin/python -m pytest -q "$@"
