"""The jobs service (jobs/) against a real Redis and a real TorchServe: submit, watch, fetch, cancel, and no job
lost when the service or a TorchServe worker is killed mid-run (docs/jobs.md)."""

import asyncio
import base64
import io
import json
import os
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import redis
import requests
from PIL import Image

import cancellation
from jobs import store as job_store
from jobs import torchserve as jobs_torchserve
from jobs.webhooks import WebhookPolicy, WebhookRefused
from jobs_calls import (CONTENT, LONG, STYLE, TINY, WebhookReceiver, conforms, read_events, record_key,
                        running_with_progress, status, submit, until, wait_for)
from jobs_instance import JobsInstance
from torchserve_instance import free_port

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def receiver_port():
    return free_port()


@pytest.fixture(scope="module")
def jobs(server, redis_server, s3_server, receiver_port, tmp_path_factory):
    """The service as in a cluster: its images in an S3 bucket (moto's server), webhooks allowed to one port."""
    with JobsInstance(tmp_path_factory.mktemp("jobs"), redis_server.url, server, env=s3_server.env,
                      webhook_allow=f"127.0.0.1/32:{receiver_port}", retention_seconds=600,
                      **s3_server.settings("test_jobs")) as instance:
        yield instance


def test_the_cancel_keys_are_the_handlers():
    assert job_store.CANCEL_KEY_PREFIX == cancellation.CANCEL_KEY_PREFIX


def test_the_handlers_refusals_before_work_wait_and_its_request_errors_fail_the_job():
    """A 503 of the handler (Busy, Expired) or of TorchServe (full queue), and a proxy's 504 before the stream
    began, are sent again later, not counted as an attempt; the request's own errors fail the job with them."""
    from failures import OUT_OF_MEMORY
    from style_transfer_handler import BUSY, EXPIRED

    def sorted_as(body: dict) -> type:
        return type(jobs_torchserve._sorted_error(body["code"], json.dumps(body).encode()))

    queue_full = {"code": 503, "type": "ServiceUnavailableException", "message": "Model is busy"}
    busy = [sorted_as(body) for body in (BUSY, {**EXPIRED, "message": "waited"}, queue_full)]
    assert busy == [jobs_torchserve.Busy] * 3
    # What the client of a proxy in front (the pod's auth proxy) gets for a request that outwaited it: nginx's page
    nginx_timeout = b"<html><head><title>504 Gateway Time-out</title></head></html>"
    assert type(jobs_torchserve._sorted_error(504, nginx_timeout)) is jobs_torchserve.Busy
    too_large = {"code": 413, "type": "TooLarge", "message": "size", "field": "size"}
    assert [sorted_as(body) for body in (OUT_OF_MEMORY, too_large)] == [jobs_torchserve.Refused] * 2


def test_twenty_jobs_submitted_at_once_are_all_done_and_fetched(jobs):
    kinds = [(as_json, response) for as_json in (False, True) for response in ("image", "json")] * 5
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda kind: submit(jobs, {**TINY, "response": kind[1]}, as_json=kind[0]), kinds))
    assert [answer.status_code for answer in answers] == [202] * 20
    ids = [answer.json()["id"] for answer in answers]
    assert len(set(ids)) == 20
    first = answers[0]
    assert first.headers["Location"] == f"/jobs/{ids[0]}" and first.json()["status"] == "queued"
    assert first.json()["urls"] == {"self": f"/jobs/{ids[0]}", "events": f"/jobs/{ids[0]}/events",
                                    "result": f"/jobs/{ids[0]}/result", "cancel": f"/jobs/{ids[0]}/cancel"}
    conforms(first.json(), "JobSubmitted")
    metrics = requests.get(jobs.metrics_url(), timeout=10).text
    assert "\nstyle_jobs_queued " in metrics and "\nstyle_jobs_running " in metrics
    assert requests.get(jobs.url("/metrics"), timeout=10).status_code == 404, "not on the API's port"
    for job_id, (_, kind) in zip(ids, kinds):
        state = wait_for(jobs, job_id)
        conforms(state, "JobStatus")
        assert state["status"] == "succeeded", state
        assert state["progress"]["steps"] == 3 and state["error"] is None
        assert state["created_at"] <= state["started_at"] <= state["finished_at"]
        result = requests.get(jobs.url(f"/jobs/{job_id}/result"), headers=jobs.auth, timeout=10)
        assert result.status_code == 200
        if kind == "json":
            fields = result.json()
            assert (fields["width"], fields["height"], fields["steps"]) == (32, 24, 3) and "image" in fields
        else:
            assert result.headers["Content-Type"] == "image/png" and result.headers["X-Style-Steps"] == "3"
            # every header the predictions endpoint gives (found by fuzzing: X-Style-Loss was missing)
            done = read_events(jobs, job_id)[-1][2]
            assert float(result.headers["X-Style-Loss"]) == pytest.approx(done["loss"]["final"]["total"], rel=1e-5)
            assert Image.open(io.BytesIO(result.content)).size == (32, 24)
    events = read_events(jobs, ids[0])
    names = [name for _, name, _ in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "done" and set(names) <= {"queued", "started",
                                                                                         "progress", "done"}
    assert events[-1][2]["result"] == f"/jobs/{ids[0]}/result" and "image" not in events[-1][2]
    # a client that reconnects with the last id it saw gets only what came after
    assert [name for _, name, _ in read_events(jobs, ids[0], last_event_id=events[-2][0])] == ["done"]
    # one that reconnects after the end event (or with an id past it) gets an ended stream, not a silent wait
    # (found by fuzzing)
    assert read_events(jobs, ids[0], last_event_id=events[-1][0], timeout=5) == []
    assert read_events(jobs, ids[0], last_event_id="99999999999999-0", timeout=5) == []
    # an id past what Redis takes (2**64) is no id of ours: all the events, not a stream broken off (found by fuzzing)
    assert read_events(jobs, ids[0], last_event_id=f"{2 ** 64}-0", timeout=5) == events


def test_every_jobs_call_needs_the_token_and_unknown_jobs_are_404(jobs):
    assert requests.get(jobs.url("/jobs/nope"), timeout=5).status_code == 401
    wrong = requests.post(jobs.url("/jobs"), headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    missing = requests.get(jobs.url("/jobs/nope"), headers=jobs.auth, timeout=5)
    assert missing.status_code == 404 and missing.json()["code"] == 404


def test_idempotent_submits(jobs):
    key = {"Idempotency-Key": f"key-{time.time()}"}
    first, again = (submit(jobs, TINY, headers=key) for _ in range(2))
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = submit(jobs, {**TINY, "steps": 4}, headers=key)
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    job_id = f"mine-{int(time.time() * 1000)}"
    created, repeated = (submit(jobs, TINY, method="PUT", job_id=job_id, as_json=True) for _ in range(2))
    assert (created.status_code, repeated.status_code) == (201, 200) and repeated.json()["id"] == job_id
    assert submit(jobs, {**TINY, "steps": 4}, method="PUT", job_id=job_id, as_json=True).status_code == 409
    assert submit(jobs, TINY, method="PUT", job_id="no.dots").status_code == 400
    assert wait_for(jobs, job_id)["status"] == "succeeded" and wait_for(jobs, first.json()["id"])


def test_bad_input_is_refused_at_submit_or_fails_the_job_with_the_predictions_error(jobs):
    no_content = requests.post(jobs.url("/jobs"), headers=jobs.auth, files={"style": STYLE}, timeout=10)
    assert no_content.status_code == 400 and no_content.json()["field"] == "content"
    conforms(no_content.json(), "JobErrorBody")
    # what only the optimisation's preparation can tell (one style_blend weight per style) fails the job
    bad = submit(jobs, {**TINY, "style_blend": [1, 1]})
    state = wait_for(jobs, bad.json()["id"])
    assert state["status"] == "failed" and state["error"]["code"] == 400, state
    assert state["error"]["field"] == "style_blend"
    conforms(state, "JobStatus")
    result = requests.get(jobs.url(bad.headers["Location"] + "/result"), headers=jobs.auth, timeout=10)
    assert result.status_code == 400 and result.json() == state["error"]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data: what a decompression bomb shows
    before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_what_the_predictions_endpoint_refuses_for_its_fields_parameters_or_image_sizes_is_refused_at_submit(
        jobs, server):
    """The same status and error body as TorchServe's own answer to the same request, before anything is queued:
    bad and unknown parameters (a job's own fields inside params too), the server's own maxima (1024 px on a CPU
    worker), too many styles, an image header declaring too many pixels or none at all, an unknown preset, a
    part the predictions endpoint does not take."""
    deadline = time.monotonic() + 20  # the service reads TorchServe's description when it starts
    while "checking submits against TorchServe's limits" not in jobs.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    multipart = [({"params": json.dumps({**TINY, "steps": "lots"})}, {}),
                 ({"params": json.dumps({**TINY, "webhook": "http://127.0.0.1/hook"})}, {}),
                 ({"presets": "nope"}, {}),
                 ({}, {f"style_{number}": STYLE for number in range(2, 6)}),
                 ({}, {"style_1": STYLE}), ({}, {"content": png_declaring(8000, 6000)}),
                 ({}, {"content": b"not an image"})]
    answers = []
    for fields, files in multipart:
        parts = {"content": CONTENT, "style": STYLE, **files}
        answers.append((requests.post(jobs.url("/jobs"), headers=jobs.auth, data=fields, files=parts, timeout=30),
                        requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                                      data=fields, files=parts, timeout=60)))
    body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(), "mask": []}
    answers.append((requests.post(jobs.url("/jobs"), headers=jobs.auth, json=body, timeout=30),
                    requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                                  json=body, timeout=60)))
    for at_submit, direct in answers:
        assert direct.status_code in (400, 413), direct.text
        assert (at_submit.status_code, at_submit.json()) == (direct.status_code, direct.json()), direct.text
        conforms(at_submit.json(), "JobErrorBody")
    fields = [at_submit.json()["field"] for at_submit, _ in answers]
    assert fields == ["steps", "webhook", "presets", "style", "style_1", "content", "content", "mask"]


def test_a_job_is_checked_against_the_job_maxima(jobs, server):
    """A job may ask more than a direct request (2048 px on a CPU worker, which it runs as segments); what not
    even a job may ask (past the job's maximum, or below the least) is refused as the predictions endpoint refuses
    it, the same body. (tests/test_jobs_segments.py runs such a job.)"""
    parts = {"content": CONTENT, "style": STYLE}
    for size in ("2049", "5"):
        over = requests.post(jobs.url("/jobs"), headers=jobs.auth, data={"size": size}, files=parts, timeout=30)
        direct = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                               data={"size": size}, files=parts, timeout=60)
        assert (over.status_code, over.json()) == (400, direct.json()), over.text
    # 2048 passes (no job is made: the next parameter, checked after size, is wrong)
    size_taken = requests.post(jobs.url("/jobs"), headers=jobs.auth, data={"size": "2048", "steps": "lots"},
                               files=parts, timeout=30)
    assert size_taken.status_code == 400 and size_taken.json()["field"] == "steps", size_taken.text


EMPTY_PART = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'


def test_multipart_bodies_are_read_as_torchserve_reads_them_and_broken_ones_refused(jobs):
    """Found by fuzzing: an image part without a file name (which TorchServe takes) was decoded as text, a 500."""
    nameless_file = {"content": (None, CONTENT, "image/jpeg"), "style": (None, STYLE)}
    taken = requests.post(jobs.url("/jobs"), headers=jobs.auth, files=nameless_file,
                          data={"params": json.dumps(TINY)}, timeout=10)
    assert taken.status_code == 202, taken.text
    unnamed = b'--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n'
    broken = b'--b\r\nnot a header line\r\n\r\nx\r\n--b--\r\n'
    too_many = EMPTY_PART * 300 + b'--b--\r\n'  # far more parts than a request holds, well within the size limit
    with_boundary = "multipart/form-data; boundary=b"
    for body, content_type in ((unnamed, with_boundary), (too_many, with_boundary), (broken, with_boundary),
                               (unnamed, "multipart/form-data")):
        refused = requests.post(jobs.url("/jobs"), headers={**jobs.auth, "Content-Type": content_type}, data=body,
                                timeout=10)
        assert refused.status_code == 400 and refused.json()["field"] == "body", (body, refused.text)
        conforms(refused.json(), "JobErrorBody")
    assert wait_for(jobs, taken.json()["id"])["status"] == "succeeded"


def test_a_method_a_path_does_not_take_is_405_with_the_allowed_ones(jobs):
    """Found by fuzzing: the JSON error body had lost the Allow header RFC 9110 requires."""
    answer = requests.delete(jobs.url("/jobs/some-job"), headers=jobs.auth, timeout=10)
    assert answer.status_code == 405 and answer.json()["code"] == 405
    assert set(answer.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PUT"}


def test_a_body_over_the_limit_is_413_naming_the_body(redis_server, tmp_path):
    """A JSON body over max_request_bytes once raised inside the error handler (a 500); a multipart one is
    counted as it is read. No TorchServe: nothing over the limit is queued."""
    with JobsInstance(tmp_path, redis_server.url, max_request_bytes=4096,
                      torchserve_url=f"http://127.0.0.1:{free_port()}") as small:
        for files, body in ((None, {"content": "A" * 8000}), ({"content": ("c.jpg", CONTENT)}, None)):
            refused = requests.post(small.url("/jobs"), headers=small.auth, files=files, json=body, timeout=10)
            assert refused.status_code == 413 and refused.json()["field"] == "body", refused.text
            assert "4096 bytes" in refused.json()["message"]
        # Parts with no data, in a body of no declared length: counted at each part, not only within its data.
        empty_parts = (EMPTY_PART for _ in range(200))
        refused = requests.post(small.url("/jobs"), data=empty_parts, timeout=10,
                                headers={**small.auth, "Content-Type": "multipart/form-data; boundary=b"})
        assert refused.status_code == 413 and refused.json()["field"] == "body", refused.text


def test_a_job_canceled_mid_run_stops_and_frees_the_worker_at_once(jobs, redis_server):
    long_job = submit(jobs, {**LONG, "max_seconds": 60}).json()["id"]
    wait_for(jobs, long_job, until=running_with_progress, timeout=60)
    canceled = requests.post(jobs.url(f"/jobs/{long_job}/cancel"), headers=jobs.auth, timeout=10)
    canceled_at = time.monotonic()
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    # queued behind the canceled run in TorchServe's one worker: it runs as soon as that run has stopped
    next_job = submit(jobs, TINY).json()["id"]
    assert wait_for(jobs, next_job, timeout=30)["status"] == "succeeded"
    assert time.monotonic() - canceled_at < 10, "the canceled run went on holding the worker"
    assert status(jobs, long_job)["status"] == "canceled"
    assert [name for _, name, _ in read_events(jobs, long_job)][-1] == "canceled"
    result = requests.get(jobs.url(f"/jobs/{long_job}/result"), headers=jobs.auth, timeout=10)
    assert result.status_code == 409 and result.json()["status"] == "canceled"
    conforms(result.json(), "JobErrorBody")
    conforms(canceled.json(), "JobStatus")
    ttl = redis.Redis.from_url(redis_server.url).ttl(record_key(long_job))
    assert 0 < ttl <= 600  # kept for the retention time, then deleted


def test_webhooks_go_only_where_the_allowlist_permits_signed(jobs, receiver_port):
    for forbidden in ("http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://127.0.0.2:9/hook",
                      "http://[::1]:9/hook", "ftp://127.0.0.1/hook", "http://user:pw@127.0.0.1/hook",
                      "http://localhost:9/hook", f"http://127.0.0.1:{receiver_port + 1}/hook"):
        refused = submit(jobs, TINY, webhook=forbidden)
        assert refused.status_code == 400 and refused.json()["field"] == "webhook", forbidden
    with WebhookReceiver(receiver_port, jobs.workdir / "webhook_secret") as receiver:
        job_id = submit(jobs, TINY, as_json=True, webhook=receiver.url,
                        webhook_events=["started", "done"]).json()["id"]
        wait_for(jobs, job_id)
        until(lambda: len(receiver.verified) >= 2, jobs, timeout=10)
    assert receiver.refused == [], "every delivery's signature verifies with the Standard Webhooks library"
    # Deliveries may arrive out of order (documented): each is named by its event, in the body and the header
    by_event = {body["event"]: body for _, body in receiver.verified}
    assert sorted(by_event) == ["done", "started"] and len(receiver.verified) == 2
    assert all(headers["X-Style-Event"] == body["event"] for headers, body in receiver.verified)
    assert by_event["started"]["job"]["started_at"] is not None
    done = by_event["done"]["job"]
    assert done["id"] == job_id and done["status"] == "succeeded" and done["event_data"]["steps"] == 3
    assert done == {**status(jobs, job_id), "event_data": done["event_data"]}, "the job's status as GET gives it"


def test_the_webhook_policy_checks_what_a_name_resolves_to():
    check = lambda allow, url: asyncio.run(WebhookPolicy(allow).check_url(url))  # noqa: E731
    with pytest.raises(WebhookRefused, match="loopback, private"):
        check(["localhost"], "http://localhost/hook")  # the name is allowed, its address is not
    check(["localhost", "127.0.0.0/8"], "http://localhost/hook")
    with pytest.raises(WebhookRefused, match="not enabled"):
        check([], "https://hooks.example.com/")
    with pytest.raises(WebhookRefused, match="not in the server's allowlist"):
        check(["*.example.com"], "https://hooks.example.org/")


def test_the_service_killed_mid_run_and_started_again_loses_no_job(jobs):
    running = submit(jobs, {**LONG, "max_seconds": 3}).json()["id"]
    queued = [submit(jobs, TINY).json()["id"] for _ in range(3)]
    wait_for(jobs, running, until=running_with_progress, timeout=60)
    jobs.kill()
    jobs.start()
    for job_id in [running, *queued]:
        assert wait_for(jobs, job_id, timeout=60)["status"] == "succeeded", jobs.log_tail()
    # the killed replica's run lost its lease: run again, not counted, and the new run says why
    started = [data for _, name, data in read_events(jobs, running) if name == "started"]
    assert [data["attempt"] for data in started] == [1, 1]
    assert started[1]["retried_after"]["type"] == "LeaseLapsed"


@pytest.fixture
def alone_on_the_queue(jobs):
    """The module's jobs service stopped for the test: the only replica on the queue is the test's own."""
    jobs.stop()
    yield
    jobs.start()


def kill_the_worker_mid_job(service, torchserve) -> tuple[str, dict]:
    """A long job submitted, the TorchServe worker running it SIGKILLed mid-run; the job and its final status."""
    job_id = submit(service, {**LONG, "max_seconds": 3}).json()["id"]
    wait_for(service, job_id, until=running_with_progress, timeout=60)
    (pid,) = torchserve.worker_pids()
    os.kill(pid, signal.SIGKILL)
    state = wait_for(service, job_id, timeout=120)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return job_id, state


def test_a_torchserve_worker_killed_mid_job_is_retried_once(alone_on_the_queue, breakable_server, redis_server,
                                                             tmp_path):
    with JobsInstance(tmp_path, redis_server.url, breakable_server) as service:
        job_id, state = kill_the_worker_mid_job(service, breakable_server)
        assert state["status"] == "succeeded", state
        started = [data for _, name, data in read_events(service, job_id) if name == "started"]
    assert [data["attempt"] for data in started] == [1, 2]
    # retried because the answer's stream broke off with the worker, not found later by the recovery loop
    assert "retried_after" not in started[0] and started[1]["retried_after"]["type"] == "WorkerLost"
    conforms(started[1]["retried_after"], "JobErrorBody")


def test_the_last_attempt_broken_by_a_worker_kill_fails_the_job_with_the_reason(alone_on_the_queue,
                                                                                breakable_server, redis_server,
                                                                                tmp_path):
    with JobsInstance(tmp_path, redis_server.url, breakable_server, max_attempts=1) as service:
        job_id, state = kill_the_worker_mid_job(service, breakable_server)
        started = [data["attempt"] for _, name, data in read_events(service, job_id) if name == "started"]
    assert state["status"] == "failed" and started == [1], state
    assert state["error"]["code"] == 502 and state["error"]["type"] == "WorkerLost", state
    assert "interrupted 1 time(s)" in state["error"]["message"], state
    conforms(state, "JobStatus")


def test_the_client_submits_follows_and_resumes_a_job_by_id(jobs, tmp_path, capsys):
    import stylize

    content, style = tmp_path / "content.jpg", tmp_path / "style.jpg"
    content.write_bytes(CONTENT)
    style.write_bytes(STYLE)
    common = ["--async", "--jobs-url", jobs.url(), "--token", jobs.token, "--json"]
    settings = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    assert stylize.main([str(content), str(style), "-o", str(tmp_path / "a.png"), *common, *settings]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert (fields["width"], fields["steps"]) == (32, 3) and Image.open(tmp_path / "a.png").size == (32, 24)
    # a job followed by a client that stopped: another run of the client picks it up by its id
    job_id = submit(jobs, TINY, response="json").json()["id"]
    assert stylize.main(["-o", str(tmp_path / "b.png"), *common, "--job", job_id]) == 0
    assert Image.open(tmp_path / "b.png").size == (32, 24)
    long_job = submit(jobs, {**LONG, "max_seconds": 60}).json()["id"]
    assert stylize.main([*common, "--job", long_job, "--cancel"]) == 0
    assert status(jobs, long_job)["status"] == "canceled"
    assert stylize.main(["-o", str(tmp_path / "c.png"), *common, "--job", long_job]) == 1
