#!/usr/bin/env python3
"""Fuzz the REST API of openapi.yaml with Schemathesis: TorchServe's predictions endpoint and the jobs service's
paths, each against its real server.

    tests/support/fuzz_api.py [--api torchserve,jobs] [--max-examples 2000] [--seed N] [--phases coverage,fuzzing]
                        [--max-time SECONDS] [--keep DIR]

Builds an archive with random weights and small maxima (FUZZ_HANDLER: every valid request takes a fraction of
a second), starts a private TorchServe on free loopback ports, and runs `schemathesis run` on the spec as this
server states it: openapi.yaml with the defaults and maxima of the server's own description (the management
API's describe call), since a server may lower the engine's maxima and the spec says so. Each API is one run
(APIS): TorchServe's paths with its inference key, then the jobs API's paths with the jobs token against a jobs
service and a Redis started for it in front of the same TorchServe (whose maxima bound every job the fuzzer
submits). Before the jobs run, a few jobs are submitted with known ids and run to their end (SEEDED_JOBS), so that
the status, events, result and cancel calls also meet jobs in every state, not only unknown ids; after it, every
job the fuzzer submitted is canceled and must have ended (none lost, none left running). Then it checks that the
worker that answered every request is the one that started. Prints Schemathesis's reports and a tally of the
answers by status and content type; exits 1 when Schemathesis found anything, a job was lost or the worker changed.

What Schemathesis checks (besides our checks in tests/support/fuzz_api_hooks.py): no 5xx but those an API documents
(TorchServe's 503 and 507, and its 500 for a multipart body it cannot decode; none from the jobs service); every
status, content type, header and JSON body as the spec documents it. Each API's excluded_checks say which of its
checks are left out, and why.
"""

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # run on its own: build_mar, instances

from build_mar import build  # noqa: E402
from jobs_instance import JobsInstance  # noqa: E402
from redis_instance import RedisInstance  # noqa: E402
from torchserve_instance import MODEL_NAME, ROOT, VENV_BIN, TorchServeInstance  # noqa: E402

SPEC = ROOT / "openapi.yaml"
HOOKS = Path(__file__).resolve().parent / "fuzz_api_hooks.py"
_HANDLER = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
# Small maxima, so that whatever the fuzzer sends is answered within a second or two on 2 CPU cores. The
# engine's defaults (256 px, 200 steps) are over them: the server sets its own, as a server may.
FUZZ_HANDLER = {**_HANDLER, "reply_margin_seconds": 6, "device_overrides": {},
                "defaults": {"size": 64, "steps": 5, "max_seconds": 3},
                "maxima": {"size": 96, "steps": 10, "max_seconds": 3}}
# One request at a time: waiting maxBatchDelay (50 ms) for a batch that never comes would be most of each answer.
FUZZ_SETTINGS = {"responseTimeout": 20, "maxBatchDelay": 1, "handler": FUZZ_HANDLER}


@dataclass(frozen=True)
class Api:
    """One server's part of openapi.yaml, and what Schemathesis holds its answers to."""
    name: str
    jobs: bool  # the paths that name the jobs service as their server; else the others, TorchServe's own
    expected_statuses: tuple[str, ...]  # what Schemathesis's not_a_server_error accepts
    excluded_checks: dict[str, str]  # Schemathesis's checks left out, and why


# TorchServe's: 503 and 507 are documented answers of a working server, and so is its own 500 for a multipart
# body its decoder refuses, which the model never sees (the hook `a_500_is_torchserves_own` fails every other
# 500, our handler's InternalError included). The checks left out are those TorchServe 0.12 fails whatever the
# model does, or that ask more than the contract.
TORCHSERVE_API = Api("torchserve", jobs=False, expected_statuses=("2XX", "4XX", "500", "503", "507"), excluded_checks={
    "ignored_auth": "TorchServe refuses a missing or wrong token with 400, where this check wants 401 or 403 "
                    "(tests/test_security.py shows that every API refuses it)",
    "missing_required_header": "the one required header is Authorization, and the same 400 answers its absence",
    "unsupported_method": "TorchServe hands every method on /predictions to the model (the spec says so)",
    "negative_data_rejection": "the server reads more than the schema promises: numbers as text, choices in "
                               "any case; what it refuses it answers with a documented 400",
    "positive_data_acceptance": "a request the schema allows may still break a rule no schema states (images "
                                "that do not decode, one style_blend weight per style): a documented 400",
})
# The jobs service's: no 5xx at all, and its own token checks (401) and methods (405) are held to as well.
JOBS_API = Api("jobs", jobs=True, expected_statuses=("2XX", "4XX"), excluded_checks={
    "negative_data_rejection": "submits are checked as the handler checks them (jobs/checks.py), and the handler "
                               "reads more than the schema promises: numbers as text, choices in any case",
    "positive_data_acceptance": "a webhook URL the schema allows is refused (400) unless the server's allowlist "
                                "permits it, and the fuzzing service permits none",
})
APIS = {api.name: api for api in (TORCHSERVE_API, JOBS_API)}
# Jobs submitted before the jobs API's run, so that its status, events, result and cancel calls meet real jobs in
# each end state (the hooks draw ids from these): id -> (params, what the job ends as).
TINY = {"size": 32, "steps": 2, "min_scale": 32}
SEEDED_JOBS = {"fuzz-canceled": (TINY, "canceled"), "fuzz-image": (TINY, "succeeded"),
               "fuzz-json": ({**TINY, "response": "json"}, "succeeded"),
               # refused only when it runs: one style_blend weight per style is the preparation's check
               "fuzz-failed": ({**TINY, "style_blend": [1, 1]}, "failed")}
JOB_ENDS = ("succeeded", "failed", "canceled")


def server_view(spec: dict, description: dict, api: Api) -> dict:
    """The spec as the servers of `api` state it: only the paths they serve (the jobs API's paths name their own
    server, the jobs service), the TorchServe's defaults, and its maxima where it lowers the engine's (the jobs
    service passes every request on to that TorchServe)."""
    spec = copy.deepcopy(spec)
    spec["paths"] = {path: item for path, item in spec["paths"].items() if ("servers" in item) == api.jobs}
    params = spec["components"]["schemas"]["Params"]["properties"]
    for parameter in description["parameters"]:
        # TorchServe leaves JSON nulls out of the description: a default of null comes as no default at all
        params[parameter["name"]]["default"] = parameter.get("default")
    for name, maximum in description["limits"]["maxima"].items():
        params[name]["maximum"] = maximum
    return spec


def describe(server: TorchServeInstance) -> dict:
    """The handler's own description of the model (docs/api.md, "The model's description")."""
    response = requests.get(server.url("management", f"/models/{MODEL_NAME}?customized=true"),
                            headers=server.auth("management"), timeout=60)
    response.raise_for_status()
    return response.json()[0]["customizedMetadata"]


def run_schemathesis(api: Api, url: str, token: str, description: dict, workdir: Path, *, seed: int,
                     max_examples: int, phases: str, max_time: int | None = None,
                     hooks_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`schemathesis run` of `api`'s paths against `url`, one request at a time; its HAR report goes to
    workdir/answers.har."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "openapi-server-view.yaml"
    spec.write_text(yaml.safe_dump(server_view(yaml.safe_load(SPEC.read_text()), description, api),
                                   sort_keys=False))
    config = workdir / "schemathesis.toml"
    config.write_text(f"[checks.not_a_server_error]\nexpected-statuses = {json.dumps(list(api.expected_statuses))}\n")
    command = [str(VENV_BIN / "schemathesis"), "--config-file", str(config), "--no-color", "run", str(spec),
               "--url", url, "--header", f"Authorization: Bearer {token}",
               "--workers", "1", "--seed", str(seed), "--max-examples", str(max_examples), "--phases", phases,
               "--exclude-checks", ",".join(api.excluded_checks), "--generation-database", "none",
               "--report", "har", "--report-har-path", str(workdir / "answers.har"),
               "--report-dir", str(workdir / "report"), "--warnings", "off"]
    if max_time is not None:
        command += ["--max-time", str(max_time)]
    return subprocess.run(command, cwd=workdir, env={**os.environ, **(hooks_env or {}),
                                                     "SCHEMATHESIS_HOOKS": str(HOOKS)},
                          capture_output=True, text=True)


def answers(har_file: Path) -> Counter:
    """How many answers the run got, by method, status and content type (from Schemathesis's HAR report)."""
    return Counter((entry["request"]["method"], entry["response"]["status"],
                    entry["response"]["content"].get("mimeType", "").split(";")[0])
                   for entry in _har_entries(har_file))


def _har_entries(har_file: Path) -> list[dict]:
    return json.loads(har_file.read_text())["log"]["entries"]


def fuzz_server(store: Path, workdir: Path, redis_url: str | None = None) -> TorchServeInstance:
    """A TorchServe (not yet started) serving a random-weights archive with FUZZ_SETTINGS; its worker reads the
    jobs' cancellations from `redis_url`, as scripts/serve.sh sets it up."""
    build("random", store, settings=FUZZ_SETTINGS)
    return TorchServeInstance(store, workdir, env={"STYLE_JOBS_REDIS_URL": redis_url} if redis_url else None)


def seed_jobs(jobs: JobsInstance, timeout: float = 60) -> list[str]:
    """Submit SEEDED_JOBS under their ids and wait until each has ended as it should; their ids."""
    for job_id, (params, end) in SEEDED_JOBS.items():
        with open(ROOT / "samples" / "tubingen.jpg", "rb") as content:
            answer = requests.put(jobs.url(f"/jobs/{job_id}"), headers=jobs.auth, files={"content": content},
                                  data={"params": json.dumps(params), "presets": "starry_night"}, timeout=30)
        answer.raise_for_status()
        if end == "canceled":  # at once, while it waits for the arq worker's next poll
            requests.post(jobs.url(f"/jobs/{job_id}/cancel"), headers=jobs.auth, timeout=10).raise_for_status()
    for job_id, (_, end) in SEEDED_JOBS.items():
        status = _wait_until_ended(jobs, job_id, timeout)
        if status != end:
            raise RuntimeError(f"the seeded job {job_id} ended {status}, not {end}:\n{jobs.log_tail()}")
    return list(SEEDED_JOBS)


def _wait_until_ended(jobs: JobsInstance, job_id: str, timeout: float) -> str:
    """The job's status once it has ended, or when `timeout` has passed; "lost" when the service knows no such
    job (within the retention time, a job is never unknown)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = requests.get(jobs.url(f"/jobs/{job_id}"), headers=jobs.auth, timeout=10)
        status = "lost" if answer.status_code == 404 else answer.json()["status"]
        if status in (*JOB_ENDS, "lost") or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def submitted_ids(har_file: Path) -> set[str]:
    """The jobs the run submitted (2xx answers to POST /jobs and PUT /jobs/{id}), from its HAR report."""
    ids = set()
    for entry in _har_entries(har_file):
        request, response = entry["request"], entry["response"]
        if request["method"] in ("POST", "PUT") and 200 <= response["status"] < 300 and \
                not request["url"].endswith("/cancel"):
            ids.add(json.loads(response["content"]["text"])["id"])
    return ids


def cancel_and_account(jobs: JobsInstance, ids: set[str], timeout: float = 30) -> dict[str, str]:
    """Cancel every job in `ids` (the run's backlog stops at once) and wait until each has ended; the ones
    that did not end, or were lost, with their last status."""
    for job_id in ids:
        requests.post(jobs.url(f"/jobs/{job_id}/cancel"), headers=jobs.auth, timeout=10)
    return {job_id: status for job_id in sorted(ids)
            if (status := _wait_until_ended(jobs, job_id, timeout)) not in JOB_ENDS}


@dataclass
class Outcome:
    api: Api
    run: subprocess.CompletedProcess
    answers: Counter
    lost_jobs: dict[str, str]  # jobs the run submitted that did not end after a cancel


def fuzz_torchserve(server: TorchServeInstance, workdir: Path, **run_args) -> Outcome:
    run = run_schemathesis(TORCHSERVE_API, server.url("inference"), server.key(), describe(server), workdir,
                           **run_args)
    return Outcome(TORCHSERVE_API, run, answers(workdir / "answers.har"), {})


def fuzz_jobs(server: TorchServeInstance, redis_url: str, workdir: Path, **run_args) -> Outcome:
    """The jobs API's run, against a jobs service started here in front of `server` (whose worker must read
    `redis_url`'s cancellations), stopped afterwards."""
    with JobsInstance(workdir / "service", redis_url, server) as jobs:
        known = seed_jobs(jobs)
        run = run_schemathesis(JOBS_API, jobs.url(), jobs.token, describe(server), workdir,
                               hooks_env={"FUZZ_JOB_IDS": ",".join(known)}, **run_args)
        lost = cancel_and_account(jobs, submitted_ids(workdir / "answers.har") - set(known))
    return Outcome(JOBS_API, run, answers(workdir / "answers.har"), lost)


def report(outcome: Outcome) -> bool:
    """Print what a run found; whether it found nothing."""
    print(outcome.run.stdout, outcome.run.stderr, sep="\n")
    for (method, status, media_type), count in sorted(outcome.answers.items()):
        print(f"fuzz_api: {outcome.api.name}: {count:5d} x {method} {status} {media_type or '(no content)'}")
    for job_id, status in outcome.lost_jobs.items():
        print(f"fuzz_api: jobs: {job_id} did not end when canceled (status {status})", file=sys.stderr)
    return outcome.run.returncode == 0 and not outcome.lost_jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default=",".join(APIS), help="the APIs to fuzz, out of " + ", ".join(APIS))
    parser.add_argument("--max-examples", type=int, default=2000, help="generated requests per operation and "
                                                                       "phase, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="coverage,fuzzing")
    parser.add_argument("--max-time", type=int, help="seconds for each API's Schemathesis run")
    parser.add_argument("--keep", type=Path, help="keep the servers' logs and the reports in this directory")
    args = parser.parse_args(argv)
    chosen = args.api.split(",")
    if not set(chosen) <= set(APIS):
        parser.error(f"--api: choose out of {', '.join(APIS)}")
    run_args = {"seed": args.seed, "max_examples": args.max_examples, "phases": args.phases,
                "max_time": args.max_time}
    with tempfile.TemporaryDirectory(prefix="fuzz_api-") as scratch, contextlib.ExitStack() as stack:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        redis_url = stack.enter_context(RedisInstance(workdir / "redis")).url if "jobs" in chosen else None
        server = stack.enter_context(fuzz_server(workdir / "store", workdir / "torchserve", redis_url))
        workers = server.worker_pids()
        found_nothing = True
        if "torchserve" in chosen:
            found_nothing &= report(fuzz_torchserve(server, workdir / "torchserve-api", **run_args))
        if "jobs" in chosen:
            found_nothing &= report(fuzz_jobs(server, redis_url, workdir / "jobs-api", **run_args))
        same_worker = server.worker_pids() == workers
    if not same_worker:
        print(f"fuzz_api: the worker changed during the run (was {workers})", file=sys.stderr)
    return 0 if found_nothing and same_worker else 1


if __name__ == "__main__":
    sys.exit(main())
