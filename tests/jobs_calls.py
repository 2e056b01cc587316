"""Calls of the jobs API for the tests of the jobs service (tests/test_jobs*.py): submit, status, waiting for a
status, reading the events, and what openapi.yaml says of the bodies."""

import base64
import collections
import contextlib
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import redis
import requests
import yaml
from standardwebhooks import Webhook, WebhookVerificationError

from conftest import ROOT, SAMPLES, STYLES
from jobs import store as job_store
from jobs.auth import DEFAULT_CLIENT
from jobs_instance import JobsInstance

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
TINY = {"size": 32, "steps": 3, "min_scale": 32}
LONG = {"size": 64, "steps": 2000, "early_stop_tol": 0, "min_scale": 64, "precision": "fp32"}
ENDED = ("succeeded", "failed", "canceled")
SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())


def conforms(body, schema: str) -> None:
    """`body` is what openapi.yaml's components/schemas/`schema` says."""
    jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": SPEC["components"]},
                                    format_checker=jsonschema.FormatChecker()).validate(body)


def submit(jobs, params: dict, *, as_json=False, headers=None, method="POST", job_id=None, **extra):
    url = jobs.url(f"/jobs/{job_id}" if job_id else "/jobs")
    headers = {**jobs.auth, **(headers or {})}
    if as_json:
        body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(),
                "params": params, **extra}
        return requests.request(method, url, json=body, headers=headers, timeout=30)
    return requests.request(method, url, files={"content": CONTENT, "style": STYLE},
                            data={"params": json.dumps(params), **extra}, headers=headers, timeout=30)


def status(jobs, job_id: str) -> dict:
    response = requests.get(jobs.url(f"/jobs/{job_id}"), headers=jobs.auth, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(jobs, job_id: str, until=lambda s: s["status"] in ENDED, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not until(state := status(jobs, job_id)):
        assert time.monotonic() < deadline, f"{job_id} still {state} after {timeout} s:\n{jobs.log_tail()}"
        assert state["status"] not in ENDED, state
        time.sleep(0.1)
    return state


def read_events(jobs, job_id: str, last_event_id: str | None = None,
                timeout: float = 120) -> list[tuple[str, str, dict]]:
    headers = {**jobs.auth, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    with requests.get(jobs.url(f"/jobs/{job_id}/events"), headers=headers, stream=True, timeout=timeout) as response:
        assert response.status_code == 200 and response.headers["Content-Type"] == "text/event-stream"
        events, fields = [], {}
        for line in response.iter_lines(decode_unicode=True):
            if line == "" and fields:
                if "event" in fields:  # not the stream's `retry:` alone
                    events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
            elif line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


def record_key(job_id: str, client: str = DEFAULT_CLIENT) -> str:
    """The Redis key of a client's job's record."""
    return job_store.key("job", job_store.job_ref(client, job_id))


def running_with_progress(state: dict) -> bool:
    return state["status"] == "running" and state["progress"] is not None


def started_events(jobs, job_id: str) -> list[dict]:
    return [data for _, name, data in read_events(jobs, job_id) if name == "started"]


def until(condition, service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.1)


def handler_runs(torchserve, job_id: str | None = None) -> list[dict]:
    """The handler's log records of the requests of job runs (of `job_id`'s only, if given), in the order they
    ended, each with `job`: "<id>.<run>", and `ended_at`: when TorchServe logged it (s since the epoch, its
    clock)."""
    records = []
    for line in (torchserve.workdir / "logs" / "model_log.log").read_text(errors="replace").splitlines():
        if "style_transfer request {" in line:
            record = json.loads(line.split("style_transfer request ", 1)[1])
            if "job" in record:  # "<client>:<id>.<run>" (a previous release's: "<id>.<run>"): the id and the run
                record["job"] = record["job"].split(":", 1)[-1]
            if "job" in record and record["job"].startswith(f"{job_id}." if job_id else ""):
                logged = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S,%f")
                records.append({**record, "ended_at": logged.timestamp()})
    return records


@contextlib.contextmanager
def two_replicas(redis_url: str, torchserve, workdir, **settings):
    """Two replicas of the jobs service with one token (started one after the other: the first writes it), one
    object store and one webhook secret."""
    settings = {"object_store": workdir / "objects", "webhook_secret_file": workdir / "webhook_secret", **settings}
    with JobsInstance(workdir / "first", redis_url, torchserve, **settings) as first, \
            JobsInstance(workdir / "second", redis_url, torchserve, token_file=first.token_file, **settings) as second:
        yield first, second


def running_on(replicas, job_id: str, redis_url: str) -> tuple[JobsInstance, JobsInstance]:
    """(the replica running the job, the other), once the job runs with progress."""
    wait_for(replicas[0], job_id, until=running_with_progress, timeout=60)
    owner = redis.Redis.from_url(redis_url).hget(record_key(job_id), "owner").decode()
    (running,) = [replica for replica in replicas if replica.replica == owner]
    return running, next(replica for replica in replicas if replica is not running)


class WebhookReceiver:
    """A real HTTP server receiving a jobs service's webhooks on 127.0.0.1:`port`, in threads: it verifies each
    delivery's signature with the Standard Webhooks library and the service's secret file, answers 503 to the
    first `refuse_tries` tries of each webhook-id and 204 after, optionally after `delay` s. It records every
    try as (webhook-id, whether it verified), the verified ones as (headers, body), and the most tries it had
    under way at once."""

    def __init__(self, port: int, secret_file: Path, refuse_tries: int = 0, delay: float = 0):
        self.port, self.secret_file, self.refuse_tries, self.delay = port, Path(secret_file), refuse_tries, delay
        self.tries: list[tuple[str, bool]] = []
        self.verified: list[tuple[dict, dict]] = []
        self.refused: list[str] = []  # why verification failed
        self.under_way = self.most_under_way = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver._receive(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def tries_of(self, webhook_id: str) -> int:
        return sum(1 for seen, _ in self.tries if seen == webhook_id)

    def _receive(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.under_way += 1
            self.most_under_way = max(self.most_under_way, self.under_way)
        try:
            body = request.rfile.read(int(request.headers["Content-Length"]))
            headers = dict(request.headers.items())
            secret = self.secret_file.read_text().split()[0]
            try:
                payload = Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError as error:
                verified, payload = False, None
                self.refused.append(str(error))
            time.sleep(self.delay)
            with self._lock:
                webhook_id = headers.get("webhook-id", "")
                self.tries.append((webhook_id, verified))
                refuse = not verified or self.tries_of(webhook_id) <= self.refuse_tries
                if not refuse:
                    self.verified.append((headers, payload))
            request.send_response(503 if refuse else 204)
            request.end_headers()
        finally:
            with self._lock:
                self.under_way -= 1

    def __enter__(self) -> "WebhookReceiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def count_by_id(tries: list[tuple[str, bool]]) -> dict[str, int]:
    return dict(collections.Counter(webhook_id for webhook_id, _ in tries))
