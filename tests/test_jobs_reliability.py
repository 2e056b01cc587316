"""The jobs service through what operators do every day, one cause at a time (docs/jobs.md, statuses through
restarts): a replica stopped with SIGTERM, a replica paused past its lease, a job past its time limit, a store
that restarts or stops answering, a store that may evict keys, a TorchServe whose queue is full. Real Redis,
real TorchServe; tests/test_jobs_chaos.py runs them together."""

import asyncio
import json
import os
import signal
import threading
import time
import uuid

import pytest
import redis.asyncio
import requests

from jobs.store import LEASES, NewJob, Quotas, Store, StoredResult, cancel_key, job_ref
from jobs.worker import LEASE_LAPSED, STOPPED, Backoff
from jobs_calls import (CONTENT, LONG, STYLE, TINY, handler_runs, read_events, record_key, running_on, started_events,
                        status, submit, two_replicas, until, wait_for)
from jobs_instance import JobsInstance
from redis_instance import RedisInstance
from torchserve_instance import free_port

pytestmark = pytest.mark.integration


UNLIMITED = Quotas(10**9, 10**9, 10**18)


def nowhere() -> str:
    """A TorchServe URL where nothing listens: jobs wait for it (Busy) until their time limit."""
    return f"http://127.0.0.1:{free_port()}"


def stream_events_in_background(jobs, job_id: str) -> dict:
    """Follow the job's event stream in a thread, once it is open; the dict gets `ended_at` (monotonic) when the
    stream ends."""
    stream = {}

    def follow():
        try:
            with requests.get(jobs.url(f"/jobs/{job_id}/events"), headers=jobs.auth, stream=True,
                              timeout=60) as response:
                stream["opened"] = response.status_code
                for _ in response.iter_lines():
                    pass
        except requests.RequestException as error:
            stream["error"] = error
        stream["ended_at"] = time.monotonic()

    threading.Thread(target=follow, daemon=True).start()
    until(lambda: "opened" in stream, jobs, timeout=10)
    return stream


def test_a_replica_stopped_with_sigterm_gives_its_job_to_another_at_once(server, redis_server, tmp_path):
    """A rolling restart: the stopped replica ends its event streams at once, gives its running job back
    without using an attempt and exits well within the deployment's grace period; another replica runs the job
    at once (its lease, far longer, never lapses), and nobody canceled it."""
    with two_replicas(redis_server.url, server, tmp_path, lease_seconds=30) as (first, second):  # 30 s: no lapse
        # long enough that it still runs in TorchServe when SIGTERM comes: its first progress line may come
        # seconds after it started on a busy CPU
        job_id = submit(first, {**LONG, "max_seconds": 6}).json()["id"]
        stopped, other = running_on((first, second), job_id, redis_server.url)
        stream = stream_events_in_background(stopped, job_id)
        stopped_at, stopped_at_epoch = time.monotonic(), time.time()
        assert stopped.terminate(timeout=25) == 0, stopped.log_tail()
        assert time.monotonic() - stopped_at < 10, "SIGTERM to exit: well within terminationGracePeriodSeconds"
        assert stream["opened"] == 200 and stream["ended_at"] - stopped_at < 3 and "error" not in stream, stream
        state = wait_for(other, job_id, timeout=60)
        events = read_events(other, job_id)
    assert state["status"] == "succeeded", state
    started = [data for _, name, data in events if name == "started"]
    assert [data["attempt"] for data in started] == [1, 1], started
    assert started[1]["retried_after"]["type"] == "ReplicaStopped"
    (second_start,) = [int(entry.split("-")[0]) / 1000 for entry, name, _ in events if name == "started"][1:]
    assert second_start - stopped_at_epoch < 5, "the other replica took the job at once, not after a lease"
    assert [name for _, name, _ in events].count("done") == 1 and "canceled" not in [name for _, name, _ in events]
    first_run, second_run = handler_runs(server, job_id)
    assert first_run["stop_reason"] == "canceled" and second_run["stop_reason"] == "max_seconds", (first_run,
                                                                                                  second_run)


def test_a_replica_paused_past_its_lease_changes_nothing_and_torchserve_stops_its_run(server, redis_server, tmp_path):
    """Fencing: a replica SIGSTOPped past its lease (a paused node) is taken for dead; another replica runs the
    job again (not counted), TorchServe stops the paused replica's run on its cancel key, and when the paused
    replica resumes it records nothing: the job ends succeeded, once."""
    with two_replicas(redis_server.url, server, tmp_path, lease_seconds=2) as (first, second):
        job_id = submit(first, {**LONG, "max_seconds": 4}).json()["id"]
        paused, other = running_on((first, second), job_id, redis_server.url)
        os.kill(paused.process.pid, signal.SIGSTOP)
        try:
            until(lambda: len(started_events(other, job_id)) == 2, other)
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
        state = wait_for(other, job_id, timeout=60)
        events = read_events(other, job_id)
        time.sleep(1)  # the resumed replica's lease keeper has found its run taken
        assert paused.process.poll() is None, "the paused replica lives on"
    assert state["status"] == "succeeded", state
    names = [name for _, name, _ in events]
    assert names.count("done") == 1 and "canceled" not in names, names
    started = [data for _, name, data in events if name == "started"]
    assert [data["attempt"] for data in started] == [1, 1] and started[1]["retried_after"]["type"] == "LeaseLapsed"
    runs = handler_runs(server, job_id)
    assert [run["stop_reason"] for run in runs] == ["canceled", "max_seconds"], runs
    assert "no longer holds its job" in paused.log_tail(200)


def test_a_run_that_no_longer_holds_its_job_changes_nothing(redis_server):
    """Fencing, transition by transition, in a real Redis: run A lets its lease lapse, the recovery gives the
    job back (stopping A in TorchServe) and run B takes it; then every transition of A is refused and changes
    nothing, while B's are taken. A client's cancel ends the job and stops B; no run begins on an ended job."""
    async def scenario():
        client = redis.asyncio.Redis.from_url(redis_server.url)
        store = Store(client, client, retention_seconds=60)
        job_id = f"fenced-{uuid.uuid4().hex}"
        ref = job_ref("default", job_id)
        created = await store.create(NewJob("default", job_id, f"default/{job_id}/n/", 2, "application/json", "print",
                                            "image", None, ()), None, UNLIMITED)
        assert created.outcome == "created"
        assert (await store.begin(ref, "a", "replica-a", 0.3, 60)).attempts == 0
        assert await store.begin(ref, "x", "replica-x", 0.3, 60) is None, "held by A"
        assert not await store.release(ref, "a", LEASE_LAPSED, counts=False, only_if_lapsed=True), "A's lease lives"
        await asyncio.sleep(0.4)
        assert await store.release(ref, "a", LEASE_LAPSED, counts=False, only_if_lapsed=True)
        assert await client.exists(cancel_key(ref, "a")), "A's request is stopped in TorchServe"
        began = await store.begin(ref, "b", "replica-b", 5, 60)
        assert began.attempts == 0 and began.retried_after == LEASE_LAPSED
        before, events = await store.get(ref), await store.events(ref, "0")
        counters = await store.counters()
        result = StoredResult(f"default/{job_id}/n/result-a", 3, "image/png", {})
        assert not await store.renew(ref, "a", 5)
        assert not await store.accept(ref, "a", {"attempt": 1})
        assert not await store.record_progress(ref, "a", {"event": "progress", "step": 1})
        assert not await store.release(ref, "a", STOPPED, counts=True)
        assert not await store.finish(ref, "succeeded", {}, result=result, run="a")
        assert not await store.finish(ref, "failed", {}, error=STOPPED, run="a")
        assert await store.end_segment(ref, "a", f"default/{job_id}/n/checkpoint-a", 5) is None
        assert (await store.get(ref), await store.events(ref, "0")) == (before, events)
        assert await store.counters() == counters, "nor any counter"
        assert await store.renew(ref, "b", 5) and await store.accept(ref, "b", {"attempt": 1})
        assert await store.record_progress(ref, "b", {"event": "progress", "step": 1})
        assert await store.finish(ref, "canceled", {"id": job_id}), "a client's cancel"
        assert await client.exists(cancel_key(ref, "b")), "stops the run that held the job"
        assert not await store.finish(ref, "succeeded", {}, run="b")
        assert await store.begin(ref, "c", "replica-c", 5, 60) is None
        assert (await store.get(ref))["status"] == "canceled"
        await client.aclose()

    asyncio.run(scenario())


def test_a_segment_hands_its_checkpoint_to_the_job_and_lets_it_go(redis_server):
    """A run whose segment ended: its checkpoint becomes the job's (counted in the client's bytes, the previous
    one's given back), the run lets the job and its lease go, and the job stays running: the next segment's run
    takes it without a second `started` event. Ending the job uncounts the checkpoint with the request."""
    async def scenario():
        client = redis.asyncio.Redis.from_url(redis_server.url)
        store = Store(client, client, retention_seconds=60)
        job_id = f"segmented-{uuid.uuid4().hex}"
        ref, objects = job_ref("default", job_id), f"default/{job_id}/n/"
        await store.create(NewJob("default", job_id, objects, 2, "application/json", "print", "image", None, ()),
                           None, UNLIMITED)
        usage = await store.usage("default")
        await store.begin(ref, "a", "replica-a", 5, 60)
        assert await store.accept(ref, "a", {"attempt": 1})
        assert await store.end_segment(ref, "a", objects + "checkpoint-a", 100) == ""
        record = await store.get(ref)
        assert (record["status"], record["run"], record["checkpoint"]) == ("running", "", objects + "checkpoint-a")
        assert await client.zscore(LEASES, ref) is None and not await store.renew(ref, "a", 5)
        assert (await store.usage("default"))["stored_bytes"] == usage["stored_bytes"] + 100
        await store.begin(ref, "b", "replica-b", 5, 60)
        assert await store.accept(ref, "b", {"attempt": 1})
        assert [name for _, name, _ in await store.events(ref, "0")].count("started") == 1
        assert await store.end_segment(ref, "b", objects + "checkpoint-b", 40) == objects + "checkpoint-a"
        assert (await store.usage("default"))["stored_bytes"] == usage["stored_bytes"] + 40
        await store.begin(ref, "c", "replica-c", 5, 60)
        result = StoredResult(objects + "result-c", 7, "image/png", {})
        assert await store.finish(ref, "succeeded", {"id": job_id}, result=result, run="c")
        assert (await store.usage("default"))["stored_bytes"] == usage["stored_bytes"] - 2 + 7
        await client.aclose()

    asyncio.run(scenario())


def test_a_job_past_its_time_limit_fails_504_and_torchserve_stops_it(server, redis_server, tmp_path):
    """Waiting for a TorchServe that is not there, or running longer than allowed: the job fails with 504
    Timeout at its time limit (the queue library's own limit lies outside it), and the run TorchServe was
    computing is stopped."""
    with JobsInstance(tmp_path / "nowhere", redis_server.url, torchserve_url=nowhere(),
                      job_timeout_seconds=2) as waiting:
        never_accepted = submit(waiting, TINY).json()["id"]
        state = wait_for(waiting, never_accepted, timeout=20)
    assert state["status"] == "failed" and state["error"]["code"] == 504 and state["error"]["type"] == "Timeout"
    with JobsInstance(tmp_path / "slow", redis_server.url, server, job_timeout_seconds=4) as slow:
        too_long = submit(slow, {**LONG, "max_seconds": 60}).json()["id"]
        state = wait_for(slow, too_long, timeout=30)
    assert state["status"] == "failed" and state["error"]["type"] == "Timeout", state
    # TorchServe's worker was freed: a request behind the job's run is answered, not after its 60 s
    started = time.monotonic()
    direct = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                           files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(TINY)}, timeout=60)
    assert direct.status_code == 200 and time.monotonic() - started < 20
    (run,) = handler_runs(server, too_long)
    assert run["stop_reason"] == "canceled", run


def test_the_store_restarting_or_not_answering_ends_no_process_and_no_job(tmp_path):
    """Redis restarted (its append-only file kept), then not answering (SIGSTOP: connections hang): the service
    lives on, /ping answers, every call answers JSON 503 with Retry-After within the store's socket timeout,
    and once the store is back the worker takes jobs again and the job that waited meanwhile goes on. No
    TorchServe: the jobs wait for it until their time limit, which ends them (504)."""
    with RedisInstance(tmp_path / "redis") as store, \
            JobsInstance(tmp_path / "jobs", store.url, torchserve_url=nowhere(), redis_timeout_seconds=1,
                         lease_seconds=2, job_timeout_seconds=8) as service:
        waiting = submit(service, TINY).json()["id"]
        until(lambda: redis.Redis.from_url(store.url).hget(record_key(waiting), "owner"), service)
        store.stop()  # while a run of `waiting` waits for TorchServe
        started = time.monotonic()
        refused = requests.get(service.url(f"/jobs/{waiting}"), headers=service.auth, timeout=10)
        assert time.monotonic() - started < 3
        assert refused.status_code == 503 and refused.json()["type"] == "StoreUnavailable", refused.text
        assert int(refused.headers["Retry-After"]) > 0
        assert requests.get(service.url("/ping"), timeout=5).status_code == 200
        store.start()
        after = submit(service, TINY)
        assert after.status_code == 202, after.text
        os.kill(store.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            hung = requests.post(service.url(f"/jobs/{waiting}/cancel"), headers=service.auth, timeout=10)
            assert time.monotonic() - started < 3, "an unanswering store: 503 within the socket timeout"
            assert hung.status_code == 503 and hung.json()["type"] == "StoreUnavailable", hung.text
        finally:
            os.kill(store.process.pid, signal.SIGCONT)
        for job_id in (waiting, after.json()["id"]):
            state = wait_for(service, job_id, timeout=30)
            assert state["status"] == "failed" and state["error"]["type"] == "Timeout", state
        assert service.process.poll() is None


def test_a_store_that_may_evict_keys_is_refused_saying_why(tmp_path):
    with RedisInstance(tmp_path / "redis") as store:
        redis.Redis.from_url(store.url).config_set("maxmemory-policy", "allkeys-lru")
        service = JobsInstance(tmp_path / "jobs", store.url, torchserve_url=nowhere()).launch()
        try:
            assert service.process.wait(timeout=30) == 2
        finally:
            service.stop()
    assert "maxmemory-policy is allkeys-lru" in service.log_path.read_text()  # the whole log: others may follow


def test_a_job_stays_queued_while_torchserve_is_full(breakable_server, redis_server, tmp_path):
    """TorchServe's queue full (job_queue_size 2: one request running, two waiting): the job waits, `queued`
    and without a `started` event, sending its request again after growing waits, each time streamed from the
    object store (Redis holds none of it); it runs once TorchServe takes it."""
    predictions = breakable_server.url("inference", "/predictions/style_transfer")
    files = {"content": CONTENT, "style": STYLE}
    store = redis.Redis.from_url(redis_server.url)

    def direct(max_seconds: float) -> requests.Response:
        params = {**LONG, "max_seconds": max_seconds, "stream": True}
        return requests.post(predictions, files=files, data={"params": json.dumps(params)}, stream=True,
                             headers=breakable_server.auth(), timeout=60)

    with JobsInstance(tmp_path, redis_server.url, breakable_server) as service:
        running = direct(5)
        progress = running.iter_lines()
        next(progress)  # its first progress line: the worker is busy with it
        filled = []
        fillers = [threading.Thread(target=lambda: filled.append(direct(1).status_code)) for _ in range(2)]
        for filler in fillers:
            filler.start()
        time.sleep(0.5)  # both wait in TorchServe's queue, which is full
        job_id = submit(service, TINY).json()["id"]
        objects = store.hget(record_key(job_id), "objects").decode()
        (request,) = (service.workdir / "objects" / objects).iterdir()
        assert request.name == "request" and request.stat().st_size > len(CONTENT) + len(STYLE)
        assert store.memory_usage(record_key(job_id)) < 4096, "the record holds no image"
        seen = set()
        for _ in progress:  # until the running request ends, TorchServe refuses the job
            state = status(service, job_id)
            seen.add((state["status"], state["started_at"]))
        full_until = time.time()
        assert seen == {("queued", None)}, seen
        state = wait_for(service, job_id, timeout=60)
        events = read_events(service, job_id)
        for filler in fillers:
            filler.join(timeout=30)
    assert filled == [200, 200], "the queue was full with them, not refusing them"
    assert "waits" in service.log_tail(400), "TorchServe refused it while full"
    assert state["status"] == "succeeded"
    (started,) = [(int(entry.split("-")[0]) / 1000, data) for entry, name, data in events if name == "started"]
    assert started[1] == {"attempt": 1} and started[0] > full_until - 0.5, "started once TorchServe took it"


def test_waits_for_a_busy_server_grow_with_jitter_and_honour_retry_after():
    waits = Backoff(0.5, 8.0)
    drawn = [waits.next() for _ in range(8)]
    steps = [0.5, 1, 2, 4, 8, 8, 8, 8]
    assert all(step / 2 <= wait <= step for wait, step in zip(drawn, steps)), drawn
    assert len({round(wait, 6) for wait in drawn[4:]}) > 1, "jittered: replicas do not retry in step"
    assert waits.next(at_least=30) >= 30
    waits.reset()
    assert waits.next() <= 0.5
