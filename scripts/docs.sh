#!/usr/bin/env bash
# The documentation site (docs/, mkdocs.yml; docs/contributing.md, "The documentation"). Sets up .venv/, then
#   scripts/docs.sh                 serves it on http://127.0.0.1:8000/, rebuilt on every change (Ctrl-C ends it)
#   scripts/docs.sh build           builds it into site/ (git ignores it)
# Further arguments go to mkdocs (e.g. scripts/docs.sh serve --dev-addr 127.0.0.1:8001).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command=${1:-serve}
[ $# -gt 0 ] && shift
NO_MKDOCS_2_WARNING=1 exec .venv/bin/python -m mkdocs "$command" --strict "$@"
