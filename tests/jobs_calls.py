"""Calls of the jobs API for the tests of the jobs service (tests/test_jobs*.py): submit, status, waiting for a
status, reading the events, and what openapi.yaml says of the bodies."""

import base64
import contextlib
import datetime
import json
import time

import jsonschema
import redis
import requests
import yaml

from conftest import ROOT, SAMPLES, STYLES
from jobs import store as job_store
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
                events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
            elif line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


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
    ended, each with `ended_at`: when TorchServe logged it (s since the epoch, its clock)."""
    records = []
    for line in (torchserve.workdir / "logs" / "model_log.log").read_text(errors="replace").splitlines():
        if "style_transfer request {" in line:
            record = json.loads(line.split("style_transfer request ", 1)[1])
            if "job" in record and record["job"].startswith(f"{job_id}." if job_id else ""):
                logged = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S,%f")
                records.append({**record, "ended_at": logged.timestamp()})
    return records


@contextlib.contextmanager
def two_replicas(redis_url: str, torchserve, workdir, **settings):
    """Two replicas of the jobs service with one token (started one after the other: the first writes it)."""
    with JobsInstance(workdir / "first", redis_url, torchserve, **settings) as first, \
            JobsInstance(workdir / "second", redis_url, torchserve, token_file=first.token_file, **settings) as second:
        yield first, second


def running_on(replicas, job_id: str, redis_url: str) -> tuple[JobsInstance, JobsInstance]:
    """(the replica running the job, the other), once the job runs with progress."""
    wait_for(replicas[0], job_id, until=running_with_progress, timeout=60)
    owner = redis.Redis.from_url(redis_url).hget(job_store.key("job", job_id), "owner").decode()
    (running,) = [replica for replica in replicas if replica.replica == owner]
    return running, next(replica for replica in replicas if replica is not running)
