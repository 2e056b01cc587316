#!/usr/bin/env bash
# Creates .venv/ in the repository root with the pinned dependencies of requirements.txt.
# Safe to run again: it reinstalls only when requirements.txt has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing requirements.txt into .venv/ (about a minute)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    echo "$wanted" > "$stamp"
fi

# Python gRPC stubs from our copy of TorchServe's .proto files (proto/), regenerated when a .proto changes.
if [ ! -f proto/gen/inference_pb2_grpc.py ] || [ -n "$(find proto -maxdepth 1 -name '*.proto' -newer proto/gen/inference_pb2_grpc.py)" ]; then
    mkdir -p proto/gen
    googleapis=$(.venv/bin/python -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
    .venv/bin/python -m grpc_tools.protoc -I proto -I "$googleapis" --python_out=proto/gen --grpc_python_out=proto/gen \
        proto/inference.proto proto/management.proto
fi
