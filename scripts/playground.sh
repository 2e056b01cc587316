#!/usr/bin/env bash
# The playground (docs/playground.md): the page of web/ on http://127.0.0.1:8090/, in front of the server
# of scripts/serve.sh (start that first), through nginx. Options: scripts/playground.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    echo "playground: needs nginx (e.g. apt-get install nginx)" >&2
    exit 1
fi
scripts/setup.sh
exec .venv/bin/python scripts/playground.py "$@"
