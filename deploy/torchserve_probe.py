#!/usr/bin/env python3
"""Health checks and graceful drain for TorchServe 0.12 with token authorization on
(docs/deployment.md, "Kubernetes").

    torchserve_probe.py ready   exit 0 when /ping answers 200: a worker of every model is up (readiness)
    torchserve_probe.py live    exit 0 when the frontend answers /ping at all and accepts the key (liveness)
    torchserve_probe.py drain   wait until no connection to the inference port is open (a preStop hook)

TorchServe 0.12 wants the inference key even on /ping and makes its keys itself, so no probe that carries a
fixed header can pass: these read the key from the key_file.json TorchServe writes into its working
directory. Where token authorization is off (the Kubernetes pod, whose TorchServe listens on loopback behind
its auth proxy: deploy/k8s/torchserve-config.yaml) there is no key file, and they send no key.
`live` tolerates a 500 (TorchServe is restarting a worker itself) but not a rejected key: the keys expire
(config.properties token_expiration_min), and only a restart brings new ones. Standard library only, so that
any Python in the image can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_FILE = os.environ.get("TS_KEY_FILE", "/home/model-server/run/key_file.json")
ESTABLISHED = "01"  # connection state in /proc/net/tcp


def ping_status(url: str, key_file: str, timeout: float) -> int | None:
    """The HTTP status of GET /ping, with the inference key when TorchServe wrote a key file (token
    authorization on; without the key it answers 400), or None when the frontend does not answer."""
    headers = {}
    if os.path.exists(key_file):
        with open(key_file) as file:
            headers["Authorization"] = f"Bearer {json.load(file)['inference']['key']}"
    request = urllib.request.Request(f"{url}/ping", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def established_connections(port: int, tables=("/proc/net/tcp", "/proc/net/tcp6")) -> int:
    """Open TCP connections whose local end is `port`: requests in flight to a server listening there."""
    count = 0
    for table in tables:
        try:
            with open(table) as file:
                rows = [line.split() for line in file.readlines()[1:]]
        except FileNotFoundError:
            continue
        count += sum(1 for row in rows if int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == ESTABLISHED)
    return count


def drain(port: int, timeout: float, quiet_for: float, poll: float = 0.5) -> bool:
    """Wait until no connection to `port` has been open for `quiet_for` seconds; False if `timeout` ran out."""
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if established_connections(port):
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_for:
            return True
        time.sleep(poll)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("ready", "live", "drain"))
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe's inference address")
    parser.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds: per request, or the whole drain")
    parser.add_argument("--quiet-for", type=float, default=5.0,
                        help="drain: seconds without a connection (covers the load balancer still sending)")
    args = parser.parse_args(argv)
    if args.check == "drain":
        port = int(args.url.rsplit(":", 1)[1].split("/")[0])
        return 0 if drain(port, args.timeout, args.quiet_for) else 1
    try:
        status = ping_status(args.url, args.key_file, args.timeout)
    except (OSError, ValueError, KeyError) as error:  # a key file that is not (wholly) TorchServe's
        print(f"torchserve_probe: cannot read the key: {error}", file=sys.stderr)
        return 1
    healthy = status == 200 if args.check == "ready" else status in (200, 500)
    if not healthy:
        print(f"torchserve_probe: {args.check}: /ping answered {status}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
