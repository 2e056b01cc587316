#!/usr/bin/env bash
# The test command (README): sets up .venv/ and runs every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/test_cluster.py runs a real nginx (Debian's package): install it when it is missing.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
fi
exec .venv/bin/python -m pytest "$@"
