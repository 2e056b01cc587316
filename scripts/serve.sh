#!/usr/bin/env bash
# The serving command (README.md, "Two commands"; docs/quickstart.md): sets up .venv/, builds model_store/style_transfer.mar and
# runs TorchServe in the foreground with config.properties (Ctrl-C stops it), and beside it, on loopback, the jobs
# service (jobs/, http://127.0.0.1:8070, its metrics on 127.0.0.1:9070) and the Redis it keeps its records in
# (Debian's redis-server); the jobs' images go to a directory, run/jobs/objects.
#   WEIGHTS=imagenet (default) | random (tests only) | /path/to/vgg19.pth
#   JOBS=off                 serve without the jobs service and Redis
#   JOBS_LISTEN=127.0.0.1:8070, JOBS_REDIS_PORT=6390, STYLE_JOBS_*: the jobs service's settings (jobs/config.py)
# Redis listens on 127.0.0.1 only, with a password kept in run/jobs/ (mode 0600); its data (append-only file)
# stays there too, so that queued jobs outlive a restart. The jobs token is written to ./jobs_token at the
# first start, as TorchServe writes ./key_file.json (replace it with `name token` lines for several clients),
# and the webhooks' signing secret to run/jobs/webhook_secret.
set -euo pipefail
cd "$(dirname "$0")/.."

redis_server=$(command -v redis-server || { [ -x /usr/sbin/redis-server ] && echo /usr/sbin/redis-server; } || true)
if [ "${JOBS:-on}" != off ] && [ -z "$redis_server" ]; then
    echo "serve: the jobs service needs Redis (apt-get install redis-server), or serve without it: JOBS=off" >&2
    exit 1
fi
scripts/setup.sh --serving  # checks for Java 17 and Python's venv first
.venv/bin/python scripts/build_mar.py --weights "${WEIGHTS:-imagenet}" --export-path model_store
echo "serve: starting; the token will be in $(pwd)/key_file.json (docs/quickstart.md)" >&2
# Says once when the model answers: /ping is 200 once its worker is up. Ends with this script (or the
# TorchServe it becomes with JOBS=off), so that nothing is left waiting.
announce_ready() {
    while kill -0 $$ 2>/dev/null; do
        if .venv/bin/python deploy/torchserve_probe.py ready --key-file key_file.json 2>/dev/null; then
            echo "serve: ready: the model answers on http://127.0.0.1:8080 (token in $(pwd)/key_file.json)" >&2
            return
        fi
        sleep 1
    done
}
announce_ready &
export PATH="$PWD/.venv/bin:$PATH"
torchserve_command=(torchserve --start --foreground --ncs --ts-config config.properties
                    --model-store model_store --models style_transfer=style_transfer.mar)
if [ "${JOBS:-on}" = off ]; then
    exec "${torchserve_command[@]}"
fi

state="$PWD/run/jobs"
mkdir -p "$state/redis"
chmod 700 "$state"
if [ ! -s "$state/redis-password" ]; then
    (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$state/redis-password")
fi
password=$(cat "$state/redis-password")
redis_port="${JOBS_REDIS_PORT:-6390}"
(umask 077 && cat > "$state/redis.conf" <<CONF
bind 127.0.0.1
port $redis_port
protected-mode yes
requirepass $password
dir $state/redis
appendonly yes
maxmemory 256mb
maxmemory-policy noeviction
daemonize no
logfile $state/redis.log
CONF
)
"$redis_server" "$state/redis.conf" &
redis_pid=$!
# The one setting of the Redis URL: the jobs service and TorchServe's worker (which reads cancellations) share it.
export STYLE_JOBS_REDIS_URL="redis://:$password@127.0.0.1:$redis_port/0"
export STYLE_JOBS_LISTEN="${JOBS_LISTEN:-127.0.0.1:8070}"
export STYLE_JOBS_OBJECT_STORE="${STYLE_JOBS_OBJECT_STORE:-$state/objects}"
export STYLE_JOBS_WEBHOOK_SECRET_FILE="${STYLE_JOBS_WEBHOOK_SECRET_FILE:-$state/webhook_secret}"
.venv/bin/python -m jobs >> "$state/jobs.log" 2>&1 &
jobs_pid=$!
stop_beside() {
    kill -TERM "$jobs_pid" 2>/dev/null && wait "$jobs_pid" 2>/dev/null || true
    kill -TERM "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
}
trap stop_beside EXIT
trap 'exit 130' INT TERM
echo "serve: jobs service on http://$STYLE_JOBS_LISTEN (token in $(pwd)/jobs_token, log in $state/jobs.log)" >&2
"${torchserve_command[@]}"
