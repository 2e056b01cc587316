"""A day of operations at once: two replicas of the jobs service, TorchServe and its Redis run 30 jobs while, in
turn, one replica is stopped with SIGTERM and started again (a rolling restart), Redis is restarted with its
append-only file kept, and one replica is SIGSTOPped past its lease (a paused node) and then SIGCONTed. Every job
ends succeeded, none canceled or lost, none used up an attempt; TorchServe never computed one job for two runs at
once unless it stopped one of them on its cancel key (the handler's log names each request's run); no process of
the service exited on its own. The causes one at a time: tests/test_jobs_reliability.py."""

import collections
import itertools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from jobs_calls import handler_runs, read_events, record_key, submit, two_replicas, until, wait_for

pytestmark = pytest.mark.integration

# Each job runs for its time budget, so that every disruption meets runs in TorchServe; TorchServe batches 8 of
# them together (model-config.yaml's batchSize).
JOB = {"size": 32, "steps": 2000, "early_stop_tol": 0, "min_scale": 32, "precision": "fp32", "max_seconds": 1}
WAVE = 10  # jobs submitted before each disruption
LEASE = 2  # s: short, so that the paused replica is taken for dead quickly


def test_thirty_jobs_through_a_rolling_restart_a_store_restart_and_a_paused_replica(server, redis_server, tmp_path):
    store = redis.Redis.from_url(redis_server.url)

    def replica_holding_a_run(ids: list[str]) -> str:
        """The name of a replica that holds a run of a job of `ids`: its request is in TorchServe."""
        found = []

        def held() -> bool:
            found.extend(owner.decode() for owner in (store.hget(record_key(job_id), "owner")
                                                      for job_id in ids) if owner)
            return bool(found)

        until(held, first, timeout=60)
        return found[0]

    with two_replicas(redis_server.url, server, tmp_path, lease_seconds=LEASE, redis_timeout_seconds=1,
                      shutdown_seconds=5) as (first, second):
        replicas = (first, second)
        by_name = lambda name: next(replica for replica in replicas if replica.replica == name)  # noqa: E731
        waves = []

        def wave() -> list[str]:
            with ThreadPoolExecutor(WAVE) as pool:  # at once, as TorchServe will take them
                answers = list(pool.map(lambda number: submit(replicas[number % 2], {**JOB, "seed": number}),
                                        range(WAVE)))
            assert [answer.status_code for answer in answers] == [202] * WAVE
            waves.append([answer.json()["id"] for answer in answers])
            return waves[-1]

        # a rolling restart of one replica
        restarted = by_name(replica_holding_a_run(wave()))
        assert restarted.terminate(timeout=10) == 0, restarted.log_tail()
        restarted.start()
        # the store restarted under running jobs
        replica_holding_a_run(wave())
        redis_server.stop()
        redis_server.start()
        # a replica paused past its lease
        paused = by_name(replica_holding_a_run(wave()))
        os.kill(paused.process.pid, signal.SIGSTOP)
        time.sleep(2.5 * LEASE)
        os.kill(paused.process.pid, signal.SIGCONT)
        ids = list(itertools.chain(*waves))
        states = {job_id: wait_for(first, job_id, timeout=120)["status"] for job_id in ids}
        events = {job_id: read_events(first, job_id) for job_id in ids}
        assert [replica.process.poll() for replica in replicas] == [None, None], "no replica exited on its own"
        logs = "\n".join(replica.log_tail(4000) for replica in replicas)
    assert collections.Counter(states.values()) == {"succeeded": 3 * WAVE}, states
    for job_id, job_events in events.items():
        names = [name for _, name, _ in job_events]
        assert names.count("done") == 1 and "canceled" not in names and "error" not in names, (job_id, names)
        assert all(data["attempt"] == 1 for _, name, data in job_events if name == "started"), job_events
    # the disruptions did meet runs: some were given back, some taken from the paused replica
    assert "ReplicaStopped" in str(events) and "LeaseLapsed" in str(events), logs
    runs = collections.defaultdict(list)
    for record in handler_runs(server):
        runs[record["job"].split(".")[0]].append(record)
    for job_id in ids:
        assert runs[job_id], f"TorchServe ran {job_id}"
        for one, other in itertools.combinations(runs[job_id], 2):
            at_once = min(one["ended_at"], other["ended_at"]) > max(one["ended_at"] - one["seconds"],
                                                                   other["ended_at"] - other["seconds"])
            assert not at_once or "canceled" in (one["stop_reason"], other["stop_reason"]), (job_id, one, other)
