#!/usr/bin/env python3
"""A bounded load on the style-transfer endpoint: a fixed number of requests from a few threads.

    STYLE_TRANSFER_TOKEN=<token> scripts/load.py --url http://127.0.0.1:8080 [--requests 40]
        [--concurrency 4] [--size 64] [--steps 5] [--timeout 330] [--content FILE] [--style FILE]

Prints one JSON line per finished request ({"event": "response", "ok", "status", "seconds", "served_by",
"retry_after", "error"}) as it finishes, then one summary line ({"event": "summary", "sent", "succeeded", "failed",
"latency_seconds": {"p50", "p90", "p99", "max"}}), latencies over the requests that succeeded. A request
succeeds when it gets 200 and a PNG. Nothing is retried here: retrying is the load balancer's job. The token
comes from the environment so that it does not show in the process list.
"""

import argparse
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKEN_VARIABLE = "STYLE_TRANSFER_TOKEN"


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def summarize(results: list[dict]) -> dict:
    latencies = [r["seconds"] for r in results if r["ok"]]
    succeeded = len(latencies)
    return {"event": "summary", "sent": len(results), "succeeded": succeeded, "failed": len(results) - succeeded,
            "latency_seconds": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                                "p99": percentile(latencies, 99), "max": max(latencies, default=None)}}


class LoadClient:
    """Sends the same style-transfer request again and again; one HTTP session per thread."""

    def __init__(self, url: str, token: str, files: dict[str, bytes], params: dict[str, str], timeout: float):
        self.url = f"{url.rstrip('/')}/predictions/style_transfer"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.files, self.params, self.timeout = files, params, timeout
        self.local = threading.local()

    def send(self) -> dict:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        started = time.monotonic()
        try:
            response = session.post(self.url, headers=self.headers, files=self.files, data=self.params,
                                    timeout=self.timeout)
        except requests.RequestException as error:
            return {"event": "response", "ok": False, "status": None, "seconds": time.monotonic() - started,
                    "served_by": None, "error": f"{type(error).__name__}: {error}"}
        ok = response.status_code == 200 and response.content.startswith(PNG_SIGNATURE)
        return {"event": "response", "ok": ok, "status": response.status_code,
                "seconds": time.monotonic() - started, "served_by": response.headers.get("X-Served-By"),
                "retry_after": response.headers.get("Retry-After"), "error": None if ok else response.text[:300]}


def run(client: LoadClient, count: int, concurrency: int, emit) -> list[dict]:
    """`count` requests, at most `concurrency` at a time; `emit` gets each result as it comes."""
    results, lock = [], threading.Lock()

    def one(_):
        result = client.send()
        with lock:
            results.append(result)
            emit(result)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(count)))
    return results


def print_line(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the load balancer (or a TorchServe) inference address")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="longer side of the output, px")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=330, help="seconds per request")
    parser.add_argument("--content", type=Path, default=ROOT / "samples" / "tubingen.jpg")
    parser.add_argument("--style", type=Path, default=ROOT / "samples" / "styles" / "starry_night.jpg")
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        parser.error(f"set {TOKEN_VARIABLE} to the inference token")
    files = {"content": args.content.read_bytes(), "style": args.style.read_bytes()}
    client = LoadClient(args.url, token, files, {"size": str(args.size), "steps": str(args.steps)}, args.timeout)
    summary = summarize(run(client, args.requests, args.concurrency, print_line))
    print_line(summary)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
