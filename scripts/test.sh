#!/usr/bin/env bash
# The test command (README.md, "Two commands"): sets up .venv/ and runs every test. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
# tests/test_cluster.py runs a real nginx (Debian's package): install it when it is missing.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
fi
# tests/test_monitoring.py runs promtool, which Debian ships in its prometheus package (2.42 on Debian 12):
# install it when it is missing, without the node exporter it recommends. Only promtool is wanted: where the
# package's service started (systemd, and a policy-rc.d that lets it), stop it and keep it from starting at boot.
if ! command -v promtool >/dev/null; then
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        $sudo systemctl disable --now prometheus
    fi
fi
# The jobs tests (tests/test_jobs*.py, tests/test_cancellation.py) run a real Redis: Debian's redis-server. Only the
# binary is wanted: where the package's service started (systemd), stop it and keep it from starting at boot.
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
    if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
        $sudo systemctl disable --now redis-server
    fi
fi
# tests/test_playground.py drives a real headless browser: Debian's chromium, which brings the libraries it
# needs (a font too, through fontconfig; its recommends are desktop services); Playwright (requirements.txt)
# only starts it, and downloads no browser of its own.
if [ ! -x /usr/bin/chromium ]; then
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
exec .venv/bin/python -m pytest "$@"
