"""Fuzzing from openapi.yaml (tests/support/fuzz_api.py): bounded Schemathesis runs against a real TorchServe,
and against a real jobs service and Redis in front of it, find nothing, reach the work as well as the refusals,
lose no job, and leave the worker that served them running. The long runs are the script's; what they found
became plain tests (tests/test_params.py, test_hostile_input.py, test_jobs.py)."""

import pytest

from fuzz_api import fuzz_jobs, fuzz_server, fuzz_torchserve

pytestmark = pytest.mark.integration

SEED = 1
MAX_EXAMPLES = 60  # of the fuzzing phase; the coverage phase adds its own, about 1000 quick refusals
JOBS_MAX_EXAMPLES = 10  # per operation, six of them; the coverage phase adds about 2300 quick answers


def readable(output: str, width: int = 300) -> str:
    """Schemathesis's report with its lines cut: a reproducing curl command carries the image bytes."""
    return "\n".join(line[:width] for line in output.splitlines())


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, redis_server):
    """One TorchServe with the fuzzing archive for both APIs; its worker reads the jobs' cancellations."""
    workdir = tmp_path_factory.mktemp("fuzz")
    with fuzz_server(workdir / "store", workdir / "torchserve", redis_server.url) as server:
        yield server


def test_fuzzing_the_predictions_endpoint_finds_nothing(fuzzed_server, tmp_path):
    (worker,) = fuzzed_server.worker_pids()
    outcome = fuzz_torchserve(fuzzed_server, tmp_path, seed=SEED, max_examples=MAX_EXAMPLES,
                              phases="coverage,fuzzing")
    assert outcome.run.returncode == 0, readable(outcome.run.stdout + outcome.run.stderr)
    assert fuzzed_server.worker_pids() == [worker], "no request may restart the worker"
    seen = {(status, media_type) for method, status, media_type in outcome.answers if method == "POST"}
    assert {(200, "image/png"), (400, "application/json"), (413, "application/json")} <= seen, seen


def test_fuzzing_the_jobs_api_finds_nothing_and_loses_no_job(fuzzed_server, redis_server, tmp_path):
    (worker,) = fuzzed_server.worker_pids()
    outcome = fuzz_jobs(fuzzed_server, redis_server.url, tmp_path, seed=SEED, max_examples=JOBS_MAX_EXAMPLES,
                        phases="coverage,fuzzing")
    assert outcome.run.returncode == 0, readable(outcome.run.stdout + outcome.run.stderr)
    assert outcome.lost_jobs == {}, "every job the fuzzer submitted ends when canceled"
    assert fuzzed_server.worker_pids() == [worker], "no job may restart the worker"
    seen = {(method, status, media_type) for method, status, media_type in outcome.answers}
    # submits taken and refused, and real jobs met: their status, events, result (an image) and cancel
    assert {("POST", 202, "application/json"), ("POST", 400, "application/json"), ("PUT", 409, "application/json"),
            ("GET", 200, "application/json"), ("GET", 200, "text/event-stream"), ("GET", 200, "image/png"),
            ("GET", 404, "application/json"), ("POST", 401, "application/json")} <= seen, seen
