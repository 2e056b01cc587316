"""The HTTP API (docs/jobs.md; openapi.yaml): submit, status, events, result, cancel, with a client's token
on every /jobs call. A job is its client's: to any other client it does not exist (404), and an
Idempotency-Key or an id chosen with PUT is the client's own. Errors have the predictions endpoint's JSON body.
/ping needs no token (liveness: the process answers, whether or not the store can be reached). The metrics
are served apart (metrics_app), on a port of their own.

While the store cannot be reached, every call that needs it answers 503 `StoreUnavailable` with Retry-After
within the store's socket timeout. Past a quota, a submit answers 429 with Retry-After; so does a stream past
the client's streams. When the replica stops, its event streams end at once (clients resume from another
replica with Last-Event-ID)."""

import asyncio
import contextlib
import hashlib
import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis

from .auth import Clients, load_or_create_token, token_matches
from .checks import ServerDescription
from .config import JobsConfig
from .events import EventHub, EventStream, TimedWriter, follow
from .objects import OBJECT_STORE_ERRORS, JobObjects, ObjectMissing, ObjectStore
from .store import (ACTIVE_STATUSES, COUNTERS, OUTBOX, PREVIOUS_FINGERPRINT, STORE_ERRORS, Created, NewJob, Quotas,
                    Store, job_ref, public_status)
from .submission import MemoryBudget, SubmitError, Submission, previous_release_fingerprint, store_submission, too_large
from .upgrade import Upgrade
from .webhooks import WebhookPolicy, WebhookRefused
from .worker import QUEUE, delete_request, enqueue

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots or colons: a run's key is "<client>:<id>.<run>"
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
MAX_IDEMPOTENCY_KEY = 255
STORE_RETRY_AFTER_SECONDS = 5
QUOTA_RETRY_AFTER_SECONDS = 30
STREAMS_RETRY_AFTER_SECONDS = 10


@dataclass
class Services:
    config: JobsConfig
    store: Store
    pool: ArqRedis
    objects: ObjectStore
    clients: Clients
    webhook_policy: WebhookPolicy
    server: ServerDescription
    hub: EventHub
    budget: MemoryBudget
    upgrade: Upgrade
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set on SIGTERM: event streams end
    streams: Counter = field(default_factory=Counter)  # client -> its event streams open on this replica

    @property
    def quotas(self) -> Quotas:
        return Quotas(self.config.client_max_unfinished, self.config.max_unfinished,
                      self.config.client_max_stored_bytes)


def error(code: int, type_: str, message: str, field: str | None = None, headers: dict | None = None,
          **extra) -> web.Response:
    return web.json_response({"code": code, "type": type_, "message": message, "field": field, **extra},
                             status=code, headers=headers)


def create_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=services.config.max_request_bytes, middlewares=[_errors, _auth])
    app["services"] = services
    app.router.add_post("/jobs", submit)
    app.router.add_put("/jobs/{id}", submit)
    app.router.add_get("/jobs/{id}", status)
    app.router.add_get("/jobs/{id}/events", events)
    app.router.add_get("/jobs/{id}/result", result)
    app.router.add_post("/jobs/{id}/cancel", cancel)
    app.router.add_get("/ping", ping)
    return app


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:  # aiohttp's, reading a JSON body
        refused = too_large(request.app["services"].config.max_request_bytes)
        return web.json_response(refused.body, status=refused.body["code"])
    except web.HTTPException as http:
        if http.status < 400:
            raise
        # Allow: the methods a path takes, with a 405 (RFC 9110)
        return error(http.status, http.reason.replace(" ", ""), http.text or http.reason,
                     headers={name: http.headers[name] for name in ("Allow",) if name in http.headers})
    except SubmitError as refused:
        return web.json_response(refused.body, status=refused.body["code"], headers=refused.headers)
    except STORE_ERRORS as failure:
        return unavailable("StoreUnavailable", "the job store", failure)
    except OBJECT_STORE_ERRORS as failure:
        return unavailable("ObjectStoreUnavailable", "the object store", failure)


def unavailable(type_: str, what: str, failure: Exception) -> web.Response:
    return error(503, type_, f"{what} cannot be reached ({type(failure).__name__}); send the request again in "
                             f"{STORE_RETRY_AFTER_SECONDS} s", None,
                 headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})


@web.middleware
async def _auth(request: web.Request, handler):
    if request.path.startswith("/jobs"):
        client = request.app["services"].clients.client(request.headers.get("Authorization"))
        if client is None:
            return error(401, "Unauthorized", "send Authorization: Bearer <token> (a token of the jobs service's "
                                              "token file)", "Authorization")
        request["client"] = client
    return await handler(request)


def _urls(job_id: str) -> dict:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "result": f"{base}/result", "cancel": f"{base}/cancel"}


def _quota_refused(which: str, services: Services) -> web.Response:
    config = services.config
    message = {"client_jobs": f"this client has {config.client_max_unfinished} jobs not yet ended, its most",
               "service_jobs": f"the service has {config.max_unfinished} jobs not yet ended, its most",
               "client_bytes": f"this client's requests and results would take more than "
                               f"{config.client_max_stored_bytes} bytes of storage, its most (results are kept "
                               f"{config.retention_seconds} s after their job ends)"}[which]
    return error(429, "QuotaExceeded", f"{message}: send it again later", None,
                 headers={"Retry-After": str(QUOTA_RETRY_AFTER_SECONDS)}, quota=which)


async def submit(request: web.Request) -> web.Response:
    services: Services = request.app["services"]
    client = request["client"]
    given_id = request.match_info.get("id")
    if given_id is not None and not JOB_ID.fullmatch(given_id):
        return error(400, "ParamError", "a job id is 1 to 64 letters, digits, '-' or '_'", "id")
    idempotency = request.headers.get("Idempotency-Key")
    if idempotency is not None and not 0 < len(idempotency) <= MAX_IDEMPOTENCY_KEY:
        return error(400, "ParamError", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                     "Idempotency-Key")
    if idempotency is None and given_id is None:  # else it may name a job that exists: the store answers
        # before reading a body that would be refused (the store checks again, atomically, when it makes the job)
        usage = await services.store.usage(client)
        if usage["unfinished"] >= services.config.client_max_unfinished:
            return _quota_refused("client_jobs", services)
        if usage["stored_bytes"] + (request.content_length or 0) > services.config.client_max_stored_bytes:
            return _quota_refused("client_bytes", services)
    job_id = given_id or uuid.uuid4().hex
    objects = JobObjects.new(client, job_id)
    await services.store.begin_upload(objects.prefix)
    try:
        submission = await store_submission(request, services.config.max_request_bytes, services.server.limits,
                                            services.objects, objects, services.budget)
        if submission.webhook is not None:
            await services.webhook_policy.check_url(submission.webhook)
        idempotency_hash = idempotency and hashlib.sha256(idempotency.encode()).hexdigest()
        await services.upgrade.move_previous(client, given_id, idempotency_hash)
        created = await services.store.create(
            NewJob(client, job_id, objects.prefix, submission.size, submission.content_type, submission.fingerprint,
                   submission.response, submission.webhook, submission.webhook_events),
            idempotency_hash, services.quotas)
        same_request = created.outcome not in ("exists", "replayed") or await _same_request(
            services, created, submission, objects)
    except BaseException as failure:
        await asyncio.shield(_discard(services, objects))
        if isinstance(failure, WebhookRefused):
            return error(400, "WebhookRefused", str(failure), "webhook")
        raise
    if created.outcome != "created":
        await _discard(services, objects)
    if created.outcome == "quota":
        return _quota_refused(created.id, services)
    if not same_request:
        if created.outcome == "replayed":
            return error(422, "IdempotencyKeyReused", "this Idempotency-Key was used for another request",
                         "Idempotency-Key")
        return error(409, "Conflict", f"job {job_id} exists with another request", "id")
    ref = job_ref(client, created.id)
    if created.outcome == "created":
        await enqueue(services.pool, ref)
    record = await services.store.get(ref)
    new = created.outcome == "created"
    code = 202 if given_id is None else (201 if new else 200)
    headers = {"Location": f"/jobs/{created.id}"}
    if not new:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response({"id": created.id, "status": record["status"] if record else "queued",
                              "urls": _urls(created.id)}, status=code, headers=headers)


async def _same_request(services: Services, created: Created, submission: Submission, objects: JobObjects) -> bool:
    """Whether the job that has the id or Idempotency-Key was submitted with what this submit sent; a job moved
    from the previous release (upgrade.py) has that release's fingerprint, of its own form."""
    if created.fingerprint == submission.fingerprint:
        return True
    return created.fingerprint.startswith(PREVIOUS_FINGERPRINT) and created.fingerprint == (
        PREVIOUS_FINGERPRINT + await previous_release_fingerprint(submission, services.objects, objects.key("request")))


async def _discard(services: Services, objects: JobObjects) -> None:
    """Delete what a submit that made no job wrote; what cannot be deleted now, retention.py deletes later."""
    with contextlib.suppress(*STORE_ERRORS, *OBJECT_STORE_ERRORS):
        await services.objects.delete_prefix(objects.prefix)
        await services.store.end_upload(objects.prefix)


async def _record(request: web.Request) -> dict:
    """The job of the path's id, if it is the calling client's; 404 for anyone else's, as for no job at all. A job
    of the previous release's layout is moved first (upgrade.py)."""
    job_id = request.match_info["id"]
    services: Services = request.app["services"]
    client = request["client"]
    record = None
    if JOB_ID.fullmatch(job_id):
        record = await services.store.get(job_ref(client, job_id))
        if record is None and await services.upgrade.move_previous(client, job_id):
            record = await services.store.get(job_ref(client, job_id))
    if record is None:
        raise web.HTTPNotFound(text=f"no job {job_id}: never submitted (by this client), or expired")
    return record


async def status(request: web.Request) -> web.Response:
    return web.json_response(public_status(await _record(request)))


async def result(request: web.Request) -> web.StreamResponse:
    """The result, streamed from the object store as it is read."""
    services: Services = request.app["services"]
    record = await _record(request)
    if record["status"] == "failed":  # what the predictions endpoint would have answered
        failure = json.loads(record["error"])
        return web.json_response(failure, status=failure["code"])
    if record["status"] != "succeeded":
        return error(409, "NotReady", f"the job is {record['status']}: no result", None, status=record["status"])
    try:
        async with services.objects.read(record["result_key"]) as stored:
            response = web.StreamResponse(headers={**json.loads(record["result_headers"]),
                                                   "Content-Type": record["result_type"]})
            response.content_length = stored.size
            await response.prepare(request)
            writer = TimedWriter(response, services.config.stream_write_timeout_seconds)
            try:
                async for chunk in stored:
                    await writer.write_bytes(chunk)
            except (OBJECT_STORE_ERRORS, TimeoutError, ConnectionResetError):
                # the answer is cut short (its Content-Length tells the client); nothing else to do
                if request.transport is not None:
                    request.transport.abort()
            return response
    except ObjectMissing:
        raise web.HTTPNotFound(text=f"no job {record['id']}: expired") from None


async def cancel(request: web.Request) -> web.Response:
    services: Services = request.app["services"]
    record = await _record(request)
    ref = job_ref(request["client"], record["id"])
    if record["status"] in ACTIVE_STATUSES:
        # ends the job and stops the run holding it, in one step: no run that begins later takes it
        if await services.store.finish(ref, "canceled", {"id": record["id"]}):
            await delete_request(services.store, services.objects, ref)
    return web.json_response(public_status(await services.store.get(ref) or record), status=202)


async def events(request: web.Request) -> web.StreamResponse:
    services: Services = request.app["services"]
    record = await _record(request)
    client = request["client"]
    if services.streams[client] >= services.config.max_streams_per_client:
        return error(429, "TooManyStreams", f"this client has {services.config.max_streams_per_client} event "
                                            f"streams open on this replica, its most: close one, or poll "
                                            f"GET /jobs/{{id}}", None,
                     headers={"Retry-After": str(STREAMS_RETRY_AFTER_SECONDS)})
    after = request.headers.get("Last-Event-ID", "0-0")
    if not _is_stream_id(after):  # what the client sent is no event id of ours: from the first
        after = "0-0"
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    services.streams[client] += 1
    try:
        await response.prepare(request)
        stream = EventStream(response, services.config.stream_write_timeout_seconds)
        ended = record["status"] not in ACTIVE_STATUSES or services.stopping.is_set()
        await follow(stream, services.hub, services.store, job_ref(client, record["id"]), after, ended,
                     services.config.event_stream_seconds, services.stopping)
    except (ConnectionResetError, *STORE_ERRORS):
        pass  # the client went away, or the store did (the client resumes with its last id): the job goes on
    except TimeoutError:  # the client stopped taking what is written
        if request.transport is not None:
            request.transport.abort()
    finally:
        services.streams[client] -= 1
        if not services.streams[client]:
            del services.streams[client]
    return response


def _is_stream_id(text: str) -> bool:
    """A Redis stream id: two unsigned 64-bit numbers (a larger one makes Redis refuse the read mid-stream)."""
    return bool(EVENT_ID.fullmatch(text)) and all(int(number) < 2 ** 64 for number in text.split("-"))


async def ping(request: web.Request) -> web.Response:
    """Liveness: the process answers. Not the store: a Redis that restarts must not restart every replica."""
    return web.json_response({"status": "Healthy"})


# --- the metrics: their own app, on their own port -------------------------------------------------------------

METRICS = (  # (name, type, help, the counter it reads)
    ("style_jobs_queued", "gauge", "Jobs not yet accepted by TorchServe (waiting in the queue or for TorchServe).",
     "queued"),
    ("style_jobs_running", "gauge", "Jobs TorchServe has accepted and is computing.", "running"),
    ("style_jobs_submitted_total", "counter", "Jobs submitted.", "submitted"),
    ("style_jobs_runs_given_back_total", "counter", "Runs given back to the queue (replica stopped, lease lapsed, "
                                                    "TorchServe's worker lost).", "given_back"),
    ("style_jobs_stored_bytes", "gauge", "Bytes of requests and results in the object store.", "stored_bytes"),
    ("style_jobs_webhook_failed_tries_total", "counter", "Webhook tries that got no 2xx.", "webhooks_failed_tries"),
)


def metrics_app(services: Services, redis: Redis, token_file: Path | None) -> web.Application:
    """GET /metrics, Prometheus' text format, read through a Redis client of its own; with `token_file`, only with
    Authorization: Bearer <its token>."""
    app = web.Application()
    app["services"], app["redis"] = services, redis
    app["token"] = load_or_create_token(token_file) if token_file else None
    app.router.add_get("/metrics", metrics)
    return app


async def metrics(request: web.Request) -> web.Response:
    """The same few reads whatever the number of jobs: the counters the transitions keep (store.py), and the
    lengths of the queue and the webhooks' outbox."""
    services: Services = request.app["services"]
    token = request.app["token"]
    if token is not None and not token_matches(request.headers.get("Authorization"), token):
        return error(401, "Unauthorized", "send Authorization: Bearer <the metrics token>", "Authorization")
    try:
        async with request.app["redis"].pipeline(transaction=False) as pipe:
            pipe.hgetall(COUNTERS)
            pipe.zcard(QUEUE)
            pipe.zcard(OUTBOX)
            counters, queue_depth, outbox = await pipe.execute()
    except STORE_ERRORS as failure:
        return unavailable("StoreUnavailable", "the job store", failure)
    counts = {name.decode(): int(value) for name, value in counters.items()}
    lines = []
    for name, kind, help_, counter in METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {counts.get(counter, 0)}"]
    lines += ["# HELP style_jobs_finished_total Jobs ended, by status.", "# TYPE style_jobs_finished_total counter"]
    lines += [f'style_jobs_finished_total{{status="{status}"}} {counts.get(status, 0)}'
              for status in ("succeeded", "failed", "canceled")]
    lines += ["# HELP style_jobs_webhook_deliveries_total Webhook deliveries settled, by outcome.",
              "# TYPE style_jobs_webhook_deliveries_total counter"]
    lines += [f'style_jobs_webhook_deliveries_total{{outcome="{outcome}"}} {counts.get(f"webhooks_{outcome}", 0)}'
              for outcome in ("delivered", "given_up")]
    lines += ["# HELP style_jobs_webhook_outbox Webhook deliveries not yet settled.",
              "# TYPE style_jobs_webhook_outbox gauge", f"style_jobs_webhook_outbox {outbox}",
              "# HELP style_jobs_queue_depth Jobs in the task queue, waiting or running.",
              "# TYPE style_jobs_queue_depth gauge", f"style_jobs_queue_depth {queue_depth}",
              "# HELP style_jobs_event_streams Event streams open on this replica.",
              "# TYPE style_jobs_event_streams gauge", f"style_jobs_event_streams {sum(services.streams.values())}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
