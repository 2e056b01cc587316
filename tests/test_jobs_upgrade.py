"""An upgrade from the previous release loses no job (docs/operations.md, "Upgrading the jobs service"): the jobs
it left queued, running (their runs still going in TorchServe) or ended, in Redis as its own code wrote them
(tests/previous_release.py), move to this release's layout when its replicas start, several at once, and end as
they would have for the client `default`, their Idempotency-Keys and ids still replaying them; jobs a replica of
the previous release takes in or ends during the rollout follow; a replica killed mid-way and started again
moves every job once; a run of the previous release is stopped in TorchServe when its job moves."""

import asyncio
import base64
import hashlib
import io
import json
import re
import subprocess
import threading
import time
import uuid
from collections import Counter

import pytest
import redis
import redis.asyncio
import requests
from arq.connections import ArqRedis
from arq.constants import default_queue_name
from PIL import Image

import previous_release
from conftest import ROOT
from jobs.objects import LocalObjects
from jobs.store import ACTIVE, COUNTERS, Store, client_key, job_ref
from jobs.upgrade import PREVIOUS_ACTIVE, Upgrade
from jobs.worker import QUEUE
from jobs_calls import (CONTENT, LONG, STYLE, TINY, handler_runs, read_events, record_key, status, submit, until,
                        wait_for)
from jobs_instance import JobsInstance
from previous_release import PreviousRelease, json_submission, multipart_submission
from torchserve_instance import free_port

pytestmark = pytest.mark.integration

RETENTION = 600
MODEL = "/predictions/style_transfer"


def client_parts(params: dict) -> list[tuple]:
    """A multipart submit's parts as jobs_calls.submit sends them (requests: the fields, then the files)."""
    return [("params", None, json.dumps(params).encode(), None), ("content", "content", CONTENT, None),
            ("style", "style", STYLE, None)]


def png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def replicas_started_at_once(workdir, redis_url: str, torchserve, count: int, **settings) -> list[JobsInstance]:
    """`count` replicas of this release sharing one token (client `default`) and object store, started
    together, as a rollout with several new pods starts them."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "jobs_token").write_text(f"upgrade-token-{uuid.uuid4().hex}\n")
    replicas = [JobsInstance(workdir / f"replica-{number}", redis_url, torchserve, token_file=workdir / "jobs_token",
                             webhook_secret_file=workdir / "webhook_secret", **settings) for number in range(count)]
    try:
        for replica in replicas:
            replica.launch()
        for replica in replicas:
            until(lambda: answers(replica), replica)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def answers(replica: JobsInstance) -> bool:
    try:
        return requests.get(replica.url("/ping"), timeout=2).ok
    except requests.ConnectionError:
        return False


def moved_in(logs: str) -> Counter:
    return Counter(re.findall(r"jobs: upgrade: (\S+) \(\w+\) moved to client default", logs))


class PreviousRun(threading.Thread):
    """A run of the previous release, as its replica sent it: the job's stored request to TorchServe with
    X-Style-Job-Id: <id>.<run>, its acceptance and progress written with that release's scripts, and its end
    tried with them too (which records nothing once the job has moved)."""

    def __init__(self, previous: PreviousRelease, torchserve, job_id: str, run: str, body: bytes, content_type: str):
        super().__init__(daemon=True)
        self.previous, self.torchserve, self.job_id, self.run_id = previous, torchserve, job_id, run
        self.body, self.content_type = body, content_type
        self.progressed = threading.Event()
        self.recorded_end: bool | None = None

    def run(self) -> None:
        headers = {**self.torchserve.auth(), "Content-Type": self.content_type,
                   "X-Style-Job-Id": f"{self.job_id}.{self.run_id}"}
        with requests.post(self.torchserve.url("inference", MODEL), data=self.body, headers=headers, stream=True,
                           timeout=120) as answer:
            self.previous.accept(self.job_id, self.run_id, {"attempt": 1})
            for line in answer.iter_lines():
                event = json.loads(line) if line.strip() else {}
                if event.get("event") == "progress":
                    self.previous.record_progress(self.job_id, self.run_id, event)
                    self.progressed.set()
                elif event.get("event") == "done":
                    self.recorded_end = self.previous.finish(
                        self.job_id, "succeeded", {"id": self.job_id},
                        result=(base64.b64decode(event["image"]), "image/png", {}), run=self.run_id)


def test_the_previous_releases_scripts_here_are_their_own():
    """The fixture's Lua is those releases' own, read from the history where this clone has it."""
    for commit, names in ((previous_release.PREVIOUS_COMMIT, {"_CREATE": "_CREATE", "_BEGIN": "_BEGIN",
                                                              "_ACCEPT": "_ACCEPT", "_PROGRESS": "_PROGRESS",
                                                              "_FINISH": "_FINISH"}),
                          (previous_release.DEC03_COMMIT, {"_CREATE": "DEC03_CREATE", "_BEGIN": "DEC03_BEGIN"})):
        shown = subprocess.run(["git", "show", f"{commit}:jobs/store.py"], cwd=ROOT, capture_output=True, text=True,
                               timeout=30)
        if shown.returncode != 0:
            pytest.skip(f"this clone has no history of {commit} (a shallow clone)")
        theirs = {}
        exec(compile(shown.stdout, f"{commit}:jobs/store.py", "exec"), theirs)
        for name, ours in names.items():
            assert getattr(previous_release, ours) == theirs[name], (commit, name)


def test_jobs_the_previous_release_left_end_as_they_would_have(server, redis_server, s3_server, tmp_path):
    store = redis.Redis.from_url(redis_server.url)
    previous = PreviousRelease(redis_server.url, RETENTION)
    tag = uuid.uuid4().hex[:8]
    ids = {name: f"{name}-{tag}" for name in ("queued", "put", "running", "succeeded", "failed", "later", "ended")}
    key = {"Idempotency-Key": f"upgrade-{tag}"}
    # queued: a multipart submit with an Idempotency-Key, and a JSON one with an id of its own (PUT)
    queued_parts = client_parts(TINY)
    assert previous.submit(ids["queued"], multipart_submission(queued_parts)[:3],
                           idempotency_key=key["Idempotency-Key"]) == "created"
    put_body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(),
                "params": TINY}
    assert previous.submit(ids["put"], json_submission(put_body)) == "created"
    # running: its run still going in TorchServe
    running_body, running_type, running_print, _ = multipart_submission(client_parts({**LONG, "max_seconds": 6}))
    previous.submit(ids["running"], (running_body, running_type, running_print))
    assert previous.begin(ids["running"], "r1")
    old_run = PreviousRun(previous, server, ids["running"], "r1", running_body, running_type)
    old_run.start()
    assert old_run.progressed.wait(60), "the previous release's run computes in TorchServe"
    # ended: a result kept, an error kept
    result = (png("red"), "image/png", {"X-Style-Steps": "3", "X-Style-Stop-Reason": "steps"})
    previous.submit(ids["succeeded"], multipart_submission(client_parts({**TINY, "seed": 1}))[:3],
                    idempotency_key=f"ended-{tag}")
    assert previous.begin(ids["succeeded"], "r2")
    assert previous.finish(ids["succeeded"], "succeeded", {"id": ids["succeeded"]}, result=result, run="r2")
    failure = {"code": 400, "type": "ParamError", "message": "steps must be at most 2000", "field": "steps"}
    previous.submit(ids["failed"], multipart_submission(client_parts(TINY))[:3])
    assert previous.begin(ids["failed"], "r3")
    assert previous.finish(ids["failed"], "failed", failure, error=failure, run="r3")
    ttl_before = store.pttl(f"style-jobs:job:{ids['succeeded']}")
    usage_before = store.hmget(client_key("default"), "unfinished")
    queued_before = int(store.hget(COUNTERS, "queued") or 0)

    replicas = replicas_started_at_once(tmp_path, redis_server.url, server, 2, retention_seconds=RETENTION,
                                        env=s3_server.env, **s3_server.settings(f"upgrade-{tag}"))
    try:
        first, second = replicas
        # during the rollout a replica of the previous release still takes a job in, and ends another
        previous.submit(ids["later"], multipart_submission(client_parts({**TINY, "seed": 2}))[:3])
        previous.ran(ids["ended"], multipart_submission(client_parts({**TINY, "seed": 3}))[:3],
                     (png("blue"), "image/png", {}))
        assert status(second, ids["ended"])["status"] == "succeeded", "asked for: moved at once"
        states = {name: wait_for(first, job_id, timeout=120) for name, job_id in ids.items()}
        old_run.join(60)
        # their Idempotency-Keys and ids replay them; another request under the key is still refused
        again = submit(second, TINY, headers=key)
        assert (again.status_code, again.json()["id"], again.headers.get("Idempotent-Replayed")) == (
            202, ids["queued"], "true"), again.text
        assert submit(second, {**TINY, "seed": 1}, headers={"Idempotency-Key": f"ended-{tag}"}).json()["id"] == \
            ids["succeeded"]
        assert submit(first, {**TINY, "steps": 4}, headers=key).status_code == 422
        put_again = submit(first, TINY, method="PUT", job_id=ids["put"], as_json=True)
        assert (put_again.status_code, put_again.headers.get("Idempotent-Replayed")) == (200, "true"), put_again.text
        result_now = requests.get(first.url(f"/jobs/{ids['succeeded']}/result"), headers=first.auth, timeout=10)
        events = {name: read_events(first, job_id) for name, job_id in ids.items()}
        logs = first.log_tail(4000) + second.log_tail(4000)
    finally:
        for replica in replicas:
            replica.stop()
    assert {name: state["status"] for name, state in states.items()} == {
        **dict.fromkeys(("queued", "put", "running", "later"), "succeeded"), "succeeded": "succeeded",
        "failed": "failed", "ended": "succeeded"}, states
    assert states["failed"]["error"] == failure
    assert (result_now.status_code, result_now.content) == (200, result[0])
    assert result_now.headers["X-Style-Stop-Reason"] == "steps"
    assert ttl_before - 60_000 < store.pttl(record_key(ids["succeeded"])) <= ttl_before, "its retention runs on"
    # the run of the previous release was stopped in TorchServe when its job moved, and recorded nothing
    runs = handler_runs(server, ids["running"])
    assert [run["job"] for run in runs][0] == f"{ids['running']}.r1" and len(runs) == 2, runs
    assert runs[0]["stop_reason"] == "canceled" and runs[1]["stop_reason"] == "max_seconds", runs
    assert not old_run.is_alive() and old_run.recorded_end is False
    names = [name for _, name, _ in events["running"]]
    assert names.count("done") == 1 and "canceled" not in names, names
    started = [data for _, name, data in events["running"] if name == "started"]
    assert [data["attempt"] for data in started] == [1, 1] and started[1]["retried_after"]["type"] == "Upgraded"
    assert [name for _, name, _ in events["succeeded"]][-1] == "done", "its events moved with it"
    # each job moved once, by one replica; nothing of them is left in the previous layout or its queue
    assert moved_in(logs) == Counter(ids.values()), logs
    for job_id in ids.values():
        for kind in ("job", "request", "result", "events", "lease"):
            assert not store.exists(f"style-jobs:{kind}:{job_id}"), (kind, job_id)
        assert not store.zscore(default_queue_name, job_id) and not store.sismember(PREVIOUS_ACTIVE, job_id)
    assert not store.exists(f"style-jobs:idempotency:{hashlib.sha256(key['Idempotency-Key'].encode()).hexdigest()}")
    assert not [member for member in store.zrange(default_queue_name, 0, -1) if b":" in member], \
        "no job of this release in the previous release's queue"
    # quotas and counters carried over: the moved jobs counted as they were taken in, and off as they ended
    assert int(store.hget(client_key("default"), "unfinished") or 0) == int(usage_before[0] or 0)
    assert int(store.hget(COUNTERS, "queued") or 0) == queued_before


def test_a_replica_killed_mid_upgrade_and_started_again_moves_every_job_once(tmp_path):
    from redis_instance import RedisInstance

    count, size = 300, 64 * 1024
    with RedisInstance(tmp_path / "redis") as private:
        store = redis.Redis.from_url(private.url)
        previous = PreviousRelease(private.url, RETENTION)
        for number in range(count):
            body = {"content": base64.b64encode(bytes([number % 256]) * size).decode(), "params": TINY}
            previous.submit(f"job-{number}", json_submission(body))
        service = JobsInstance(tmp_path / "jobs", private.url, torchserve_url=f"http://127.0.0.1:{free_port()}")
        try:
            service.launch()
            deadline = time.monotonic() + 60
            while "moved to client default and queued" not in service.log_path.read_text():
                assert time.monotonic() < deadline and service.process.poll() is None, service.log_tail()
                time.sleep(0.01)
            service.kill()
        finally:
            service.stop()
        left_at_kill = store.scard(PREVIOUS_ACTIVE)
        moved_before = moved_in(service.log_path.read_text())
        assert 0 < left_at_kill < count, "killed mid-way"
        with service:  # started again
            until(lambda: store.scard(PREVIOUS_ACTIVE) == 0 and store.zcard(ACTIVE) == count, service, timeout=120)
            refs = [job_ref("default", f"job-{number}") for number in range(count)]
            until(lambda: all(store.exists(f"arq:job:{ref}") for ref in refs), service, timeout=60)
            moved_after = moved_in(service.log_path.read_text()) - moved_before
            records = [store.hgetall(f"style-jobs:job:{ref}") for ref in refs]
            counters = store.hgetall(COUNTERS)
            usage = store.hgetall(client_key("default"))
            uploads = {member.decode() for member in store.zrange("style-jobs:uploads", 0, -1)}
            queued = {member.decode() for member in store.zrange(QUEUE, 0, -1)}
    assert all(record[b"status"] == b"queued" and record[b"client"] == b"default" for record in records)
    assert set(refs) <= queued
    assert max((moved_before + moved_after).values()) == 1, "no job moved twice"
    assert int(counters[b"queued"]) == count and int(usage[b"unfinished"]) == count
    sizes = [int(record[b"request_bytes"]) for record in records]
    assert int(usage[b"stored_bytes"]) == int(counters[b"stored_bytes"]) == sum(sizes)
    # each job's request is in the object store once, under its record's prefix; a copy the killed replica made
    # for a step it never took is listed for the sweeper
    objects = tmp_path / "jobs" / "objects" / "default"
    for record, number in zip(records, range(count)):
        prefix = record[b"objects"].decode()
        assert (tmp_path / "jobs" / "objects" / prefix / "request").stat().st_size == int(record[b"request_bytes"])
        for copy in (objects / f"job-{number}").iterdir():
            assert f"default/job-{number}/{copy.name}/" == prefix or f"default/job-{number}/{copy.name}/" in uploads


def test_a_job_2026_12_03s_release_was_running_is_taken_from_its_run(redis_server, tmp_path):
    """That release named a run by the job's attempt (`<id>.<n>`), counting the running one."""
    previous = PreviousRelease(redis_server.url, RETENTION)
    job_id = f"dec03-{uuid.uuid4().hex[:8]}"
    previous.submit(job_id, json_submission({"content": base64.b64encode(CONTENT).decode(), "params": TINY}),
                    dec03=True)
    assert previous.dec03_begin(job_id) == 1
    assert previous.dec03_begin(job_id) == 2, "its first run broke off, and counted"

    async def move() -> tuple[str, dict]:
        client = ArqRedis.from_url(redis_server.url)
        store = Store(client, client, RETENTION)
        objects = LocalObjects(tmp_path / "objects")
        await objects.start()
        outcome = await Upgrade(store, client, objects, "test").move(job_id)
        record = await store.get(job_ref("default", job_id))
        await client.aclose()
        return outcome, record

    outcome, record = asyncio.run(move())
    store = redis.Redis.from_url(redis_server.url)
    assert outcome == "moved" and record["status"] == "queued" and record["run"] == ""
    assert record["attempts"] == "1" and json.loads(record["retried_after"])["type"] == "Upgraded"
    assert store.exists(f"style-jobs:cancel:{job_id}.2"), "TorchServe stops its run"
    assert store.zscore(QUEUE, job_ref("default", job_id)) and not store.zscore(default_queue_name, job_id)
    assert (tmp_path / "objects" / record["objects"] / "request").read_bytes().startswith(b'{"content"')
