#!/usr/bin/env bash
# Creates .venv/ in the repository root with the pinned dependencies of requirements.txt.
#   scripts/setup.sh            the Python environment (needs Python 3.11 or newer with venv: python3-venv)
#   scripts/setup.sh --serving  the same, after checking for Java 17 or newer, which TorchServe needs
# It checks its prerequisites first and says what to install. Safe to run again: it reinstalls only when
# requirements.txt has changed, and makes .venv/ again when an earlier run left it without pip.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

fail() {
    echo "setup: $*" >&2
    exit 1
}

# The major version of the `java` on PATH ("1.8.0" is 8, "17.0.13" is 17), or nothing without one.
java_major() {
    java -version 2>&1 | sed -n 's/.* version "\([0-9]*\)\.\{0,1\}\([0-9]*\).*/\1 \2/p' | head -n 1 |
        awk '{ print ($1 == 1) ? $2 : $1 }'
}

if [ "${1:-}" = --serving ]; then
    java=$(java_major || true)
    if [ -z "$java" ] || [ "$java" -lt 17 ]; then
        fail "TorchServe needs Java 17 or newer (found: ${java:-none}): apt-get install openjdk-17-jre-headless"
    fi
elif [ $# -gt 0 ]; then
    fail "unknown argument $1 (scripts/setup.sh [--serving])"
fi

if [ -e .venv ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv/ has no working pip (an earlier setup failed or was stopped): making it again" >&2
    rm -rf .venv
fi
command -v "$python" >/dev/null || fail "needs Python 3.11 or newer ($python not found): apt-get install python3 python3-venv"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "needs Python 3.11 or newer; $python is $("$python" --version 2>&1)"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
    fail "$python cannot make a virtual environment: apt-get install python3-venv"

if [ ! -e .venv ]; then
    "$python" -m venv .venv || { rm -rf .venv; fail "$python -m venv .venv failed (see above)"; }
fi
stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing requirements.txt into .venv/ (a few minutes the first time)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt ||
        fail "pip could not install requirements.txt (see above); run scripts/setup.sh again once that is fixed"
    echo "$wanted" > "$stamp"
fi

# Python gRPC stubs from our copy of TorchServe's .proto files (proto/), regenerated when a .proto changes.
if [ ! -f proto/gen/inference_pb2_grpc.py ] || [ -n "$(find proto -maxdepth 1 -name '*.proto' -newer proto/gen/inference_pb2_grpc.py)" ]; then
    mkdir -p proto/gen
    googleapis=$(.venv/bin/python -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
    .venv/bin/python -m grpc_tools.protoc -I proto -I "$googleapis" --python_out=proto/gen --grpc_python_out=proto/gen \
        proto/inference.proto proto/management.proto
fi
