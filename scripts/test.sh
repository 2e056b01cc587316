#!/usr/bin/env bash
# The test command (README.md, "Two commands"): sets up .venv/ and runs every test. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# On a fresh machine both take minutes, pip unpacking wheels and apt-get downloading: .venv/ is set up while
# the Debian packages below are installed, and the tests wait for both.
scripts/setup.sh &
setup=$!
trap 'kill "$setup" 2>/dev/null || true' EXIT
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
# What the tests run that pip does not bring comes from Debian's packages. Only the programs are wanted: the
# tests start and stop their own instances. Where a package's service started with it (systemd, or its init
# script where no policy-rc.d forbids it), it is stopped and kept from starting at boot: nothing is left running.
updated=""
install_without_its_service() {  # PACKAGE SERVICE [apt-get install options]
    local package=$1 service=$2
    shift 2
    [ -n "$updated" ] || { $sudo apt-get update -qq; updated=yes; }
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" "$package"
    if [ -n "$service" ] && command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        $sudo systemctl disable --now "$service"
    elif [ -n "$service" ] && [ -x "/etc/init.d/$service" ] && "/etc/init.d/$service" status >/dev/null 2>&1; then
        $sudo "/etc/init.d/$service" stop
        $sudo update-rc.d "$service" disable >/dev/null
    fi
}
# tests/test_cluster.py and others run a real nginx.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    install_without_its_service nginx nginx
fi
# tests/test_monitoring.py runs promtool, which Debian ships in its prometheus package (2.42 on Debian 12), without
# the node exporter it recommends.
if ! command -v promtool >/dev/null; then
    install_without_its_service prometheus prometheus --no-install-recommends
fi
# The jobs tests (tests/test_jobs*.py, tests/test_cancellation.py) run a real Redis: Debian's redis-server.
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    install_without_its_service redis-server redis-server --no-install-recommends
fi
# tests/test_playground.py drives a real headless browser: Debian's chromium, which brings the libraries it
# needs (a font too, through fontconfig; its recommends are desktop services); Playwright (requirements.txt)
# only starts it, and downloads no browser of its own. It has no service.
if [ ! -x /usr/bin/chromium ]; then
    install_without_its_service chromium "" --no-install-recommends
fi
wait "$setup"
trap - EXIT
exec .venv/bin/python -m pytest "$@"
