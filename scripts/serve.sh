#!/usr/bin/env bash
# The serving command (README.md, "Two commands"): sets up .venv/, builds model_store/style_transfer.mar and
# runs TorchServe in the foreground with config.properties (Ctrl-C stops it).
#   WEIGHTS=imagenet (default) | random (tests only) | /path/to/vgg19.pth
set -euo pipefail
cd "$(dirname "$0")/.."

if ! java -version >/dev/null 2>&1; then
    echo "serve: TorchServe needs Java 11 or newer (e.g. apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
scripts/setup.sh
.venv/bin/python scripts/build_mar.py --weights "${WEIGHTS:-imagenet}" --export-path model_store
echo "serve: the token is in $(pwd)/key_file.json once TorchServe has started (docs/api.md)" >&2
export PATH="$PWD/.venv/bin:$PATH"
exec torchserve --start --foreground --ncs --ts-config config.properties \
    --model-store model_store --models style_transfer=style_transfer.mar
