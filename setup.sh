#!/usr/bin/env bash
# Install what warmexec needs on a Debian machine, as root: runc and a static busybox
# (the tests' and demo's container rootfs), Prometheus (its promtool and server check the
# alert rules and the dashboard's queries), gcc and libc6-dev (the hostile-container
# tests build their attacker's tools), Debian's docker.io (dockerd 20.10 with its containerd
# 1.6 and ctr: the Docker and containerd parity tests start private daemons of their own,
# never the host's; on a systemd host the package also enables its own docker.service), and a
# virtualenv (.venv) holding the project with its test and bench extras, and Node.js with npm
# (the example client in protocol/clients/node/ and its packages). Idempotent: a
# second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v runc >/dev/null 2>&1 || need+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # the rules and real-Prometheus tests
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v gcc >/dev/null 2>&1 || need+=(gcc)                # the hostile-container tests
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)       # static attacker tools
dpkg -s docker.io >/dev/null 2>&1 || need+=(docker.io)       # the Docker parity tests
dpkg -s containerd >/dev/null 2>&1 || need+=(containerd)     # containerd and ctr (docker.io's dependency)
command -v node >/dev/null 2>&1 || need+=(nodejs)            # the Node.js example client's test
command -v npm >/dev/null 2>&1 || need+=(npm)
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'

# The Node.js example client's packages (zeromq ships prebuilt binaries), once.
node_dir=protocol/clients/node
if [ ! -d "$node_dir/node_modules/zeromq" ] || [ ! -d "$node_dir/node_modules/@msgpack/msgpack" ]; then
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) \
        || echo "setup: npm could not install the Node.js client's packages; its test will skip"
fi
