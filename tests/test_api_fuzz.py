"""Fuzzing from openapi.yaml (scripts/fuzz_api.py): a bounded Schemathesis run against a real TorchServe finds
nothing, reaches the optimisation as well as the refusals, and leaves the worker that served it running.
The long run is the script's; what it found became plain tests (tests/test_params.py, test_hostile_input.py)."""

import pytest

from fuzz_api import answers, fuzz_server, run_schemathesis

pytestmark = pytest.mark.integration

SEED = 1
MAX_EXAMPLES = 60  # of the fuzzing phase; the coverage phase adds its own, about 1000 quick refusals


def readable(output: str, width: int = 300) -> str:
    """Schemathesis's report with its lines cut: a reproducing curl command carries the image bytes."""
    return "\n".join(line[:width] for line in output.splitlines())


def test_fuzzing_from_the_spec_finds_nothing(tmp_path):
    with fuzz_server(tmp_path / "store", tmp_path / "torchserve") as server:
        (worker,) = server.worker_pids()
        run = run_schemathesis(server, tmp_path, seed=SEED, max_examples=MAX_EXAMPLES, phases="coverage,fuzzing")
        assert run.returncode == 0, readable(run.stdout + run.stderr)
        assert server.worker_pids() == [worker], "no request may restart the worker"
    seen = {(status, media_type) for method, status, media_type in answers(tmp_path / "answers.har")
            if method == "POST"}
    assert {(200, "image/png"), (400, "application/json"), (413, "application/json")} <= seen, seen
