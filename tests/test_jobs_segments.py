"""Jobs run as segments (jobs/segments.py, jobs/worker.py) through a real TorchServe and Redis: each segment an
ordinary request that ends with a checkpoint, the job queued again behind the jobs waiting, and the whole read
as one run; a cancel stops the current segment; a worker killed mid-segment loses only that segment."""

import io
import json
import os
import signal
import time

import pytest
import redis
import requests
from PIL import Image

from conftest import SAMPLES, STYLES
from jobs import store as job_store
from jobs.auth import DEFAULT_CLIENT
from jobs_calls import LONG, TINY, handler_runs, read_events, running_with_progress, status, submit, until, wait_for
from jobs_instance import JobsInstance
from redis_instance import RedisInstance

pytestmark = pytest.mark.integration
CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
UNSEGMENTED_STEPS = 40
EQUAL = {"size": 64, "steps": UNSEGMENTED_STEPS, "min_scale": 32, "early_stop_tol": 0, "precision": "fp32"}
SEGMENT_SECONDS = 1.0


def segments_of(torchserve, job_id: str) -> list[dict]:
    return [run for run in handler_runs(torchserve, job_id) if run.get("stop_reason") == "segment"]


def events_so_far(redis_url: str, job_id: str) -> list[tuple[str, str, dict]]:
    """The job's events until now, read from the store (GET .../events holds the stream open while it runs)."""
    entries = redis.Redis.from_url(redis_url).xrange(job_store.key("events", job_store.job_ref(DEFAULT_CLIENT, job_id)))
    return [(entry.decode(), fields[b"event"].decode(), json.loads(fields[b"data"])) for entry, fields in entries]


def progress_steps(events) -> list[int]:
    return [data["step"] for _, name, data in events if name == "progress"]


def test_a_segmented_job_reads_as_one_run_and_reaches_the_unsegmented_loss(server, tmp_path):
    """A Redis of its own: the bytes stored for the client are this job's alone."""
    with RedisInstance(tmp_path / "redis") as private, \
            JobsInstance(tmp_path / "jobs", private.url, server, segment_seconds=0.3) as jobs:
        job_id = submit(jobs, EQUAL).json()["id"]
        state = wait_for(jobs, job_id, timeout=120)
        events = read_events(jobs, job_id)
        result = requests.get(jobs.url(f"/jobs/{job_id}/result"), headers=jobs.auth, timeout=30)
        stored = redis.Redis.from_url(private.url).hgetall(job_store.client_key(DEFAULT_CLIENT))
        objects = sorted(path.name for path in (tmp_path / "jobs" / "objects").rglob("*") if path.is_file())
    assert state["status"] == "succeeded", state
    assert len(segments_of(server, job_id)) >= 3, handler_runs(server, job_id)
    names = [name for _, name, _ in events]
    assert names.count("started") == 1 and names.count("done") == 1 and names[-1] == "done", names
    steps = progress_steps(events)
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps  # one run's progress
    assert events[-1][2]["steps"] == UNSEGMENTED_STEPS
    direct = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                           files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(EQUAL)},
                           timeout=120)
    whole, segmented = float(direct.headers["X-Style-Loss"]), float(result.headers["X-Style-Loss"])
    assert abs(segmented - whole) <= 0.02 * whole, (segmented, whole)
    assert not [name for name in objects if "checkpoint" in name], objects  # deleted with the request
    assert int(stored[b"stored_bytes"]) == len(result.content), stored


def test_a_cancel_stops_the_current_segment_and_no_other_follows(server, redis_server, tmp_path):
    segment = 3 * SEGMENT_SECONDS  # so that the cancel comes mid-segment, once the next segment reports
    with JobsInstance(tmp_path, redis_server.url, server, segment_seconds=segment) as jobs:
        job_id = submit(jobs, {**LONG, "max_seconds": None}).json()["id"]
        until(lambda: len(segments_of(server, job_id)) >= 1, jobs, timeout=60)
        saved = segments_of(server, job_id)[-1]["steps"]
        wait_for(jobs, job_id, until=lambda state: (state["progress"] or {}).get("step", 0) > saved, timeout=60)
        canceled_at = time.time()
        assert requests.post(jobs.url(f"/jobs/{job_id}/cancel"), headers=jobs.auth, timeout=10).status_code == 202
        until(lambda: handler_runs(server, job_id)[-1]["stop_reason"] == "canceled", jobs, timeout=30)
        runs = handler_runs(server, job_id)
        time.sleep(segment)
        assert handler_runs(server, job_id) == runs, "no segment after the cancel"
        assert status(jobs, job_id)["status"] == "canceled"
    assert runs[-1]["ended_at"] - canceled_at < 2, runs[-1]  # the segment stopped, not run out


def test_small_jobs_get_the_worker_between_a_long_jobs_segments(server, redis_server, tmp_path):
    """One run at a time (concurrency 1): a small job submitted while a long job runs goes before the long job's
    next segment, and ends within about one segment's time."""
    with JobsInstance(tmp_path, redis_server.url, server, segment_seconds=SEGMENT_SECONDS, concurrency=1) as jobs:
        long_job = submit(jobs, {**LONG, "max_seconds": None}).json()["id"]
        wait_for(jobs, long_job, until=running_with_progress, timeout=60)
        submitted = time.monotonic()
        small = [submit(jobs, TINY).json()["id"] for _ in range(2)]
        states = [wait_for(jobs, job_id, timeout=60) for job_id in small]
        took = time.monotonic() - submitted
        long_state = status(jobs, long_job)
        requests.post(jobs.url(f"/jobs/{long_job}/cancel"), headers=jobs.auth, timeout=10)
    assert [state["status"] for state in states] == ["succeeded"] * 2, states
    assert long_state["status"] == "running", long_state
    # a segment's time, the two small runs (a second or two each on a busy CPU), and a margin
    assert took < SEGMENT_SECONDS + 10, took


def test_a_worker_killed_mid_segment_loses_at_most_that_segment(breakable_server, redis_server, tmp_path):
    with JobsInstance(tmp_path, redis_server.url, breakable_server, segment_seconds=SEGMENT_SECONDS) as jobs:
        job_id = submit(jobs, {**LONG, "max_seconds": None}).json()["id"]
        until(lambda: len(segments_of(breakable_server, job_id)) >= 2, jobs, timeout=60)
        saved = segments_of(breakable_server, job_id)[-1]["steps"]
        # mid-segment: once the next segment reports (its stream has begun)
        wait_for(jobs, job_id, until=lambda state: (state["progress"] or {}).get("step", 0) > saved, timeout=60)
        (pid,) = breakable_server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        lost, ended = status(jobs, job_id)["progress"]["step"], len(segments_of(breakable_server, job_id))
        def names() -> list[str]:
            return [name for _, name, _ in events_so_far(redis_server.url, job_id)]

        until(lambda: names().count("started") == 2, jobs, timeout=120)  # the run after the worker died
        until(lambda: names()[-1] == "progress" and names().count("started") == 2, jobs, timeout=120)
        events = events_so_far(redis_server.url, job_id)
        until(lambda: len(segments_of(breakable_server, job_id)) > ended, jobs, timeout=60)
        requests.post(jobs.url(f"/jobs/{job_id}/cancel"), headers=jobs.auth, timeout=10)
    second_start = max(index for index, (_, name, _) in enumerate(events) if name == "started")
    assert events[second_start][2]["retried_after"]["type"] == "WorkerLost", events[second_start]
    after = progress_steps(events[second_start:])
    # went on from the last checkpoint: what the killed segment did is lost, nothing before it
    assert after and saved < min(after) <= lost + 1, (saved, lost, after)
    assert segments_of(breakable_server, job_id)[-1]["steps"] > saved


def test_a_submit_with_a_checkpoint_of_its_own_is_refused_naming_it(server, redis_server, tmp_path):
    with JobsInstance(tmp_path, redis_server.url, server) as jobs:
        multipart = submit(jobs, TINY, checkpoint="forged")
        as_json = submit(jobs, TINY, as_json=True, checkpoint="Zm9yZ2Vk")
    for refused in (multipart, as_json):
        assert refused.status_code == 400 and refused.json()["field"] == "checkpoint", refused.text


def test_a_2048_px_job_on_a_cpu_runs_as_segments_while_small_jobs_pass(server, redis_server, tmp_path):
    """What only a job may ask on a CPU: 2048 px (a direct request gets 413), as cheap as it can be: one scale,
    two iterations, one a segment (a segment runs at least one iteration, however short its time), through
    VGG19's first convolution only (the passes stop at the deepest layer asked: a two-hundredth of the whole
    network's work, the same path through the jobs service and the handler). Small jobs submitted meanwhile end
    within about one segment's time: one iteration here and the fixed work around it."""
    huge = {"size": 2048, "steps": 2, "min_scale": 2048, "style_scale": 0.5, "early_stop_tol": 0,
            "content_layer": "relu1_1", "style_layers": {"relu1_1": 1.0}}
    direct = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                           files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(huge)}, timeout=60)
    assert direct.status_code == 413 and "POST /jobs" in direct.json()["message"], direct.text
    with JobsInstance(tmp_path, redis_server.url, server, segment_seconds=SEGMENT_SECONDS) as jobs:
        job_id = submit(jobs, huge).json()["id"]
        wait_for(jobs, job_id, until=running_with_progress, timeout=600)
        submitted = time.monotonic()
        small = submit(jobs, TINY).json()["id"]
        small_state = wait_for(jobs, small, timeout=600)
        small_took = time.monotonic() - submitted
        state = wait_for(jobs, job_id, timeout=600)
        result = requests.get(jobs.url(f"/jobs/{job_id}/result"), headers=jobs.auth, timeout=60)
    segment = segments_of(server, job_id)[0]
    assert state["status"] == small_state["status"] == "succeeded", (state, small_state)
    assert state["progress"]["step"] >= 1 and result.headers["X-Style-Steps"] == "2"
    assert Image.open(io.BytesIO(result.content)).size == (2048, 1536)
    assert small_took < 1.5 * segment["seconds"], (small_took, segment)
