"""The HTTP API (CONTRACT.md "jobs"; openapi.yaml): submit, status, events, result, cancel, with the clients'
token on every /jobs call. Errors have the predictions endpoint's JSON body. /ping and /metrics need no token
(health checks and Prometheus; they tell nothing about any job).

While the store cannot be reached, every call that needs it answers 503 `StoreUnavailable` with Retry-After
within the store's socket timeout; /ping does not need it (liveness: the process answers). When the replica
stops, its event streams end at once (clients resume from another replica with Last-Event-ID)."""

import asyncio
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from arq.connections import ArqRedis

from .auth import token_matches
from .checks import ServerDescription
from .store import ACTIVE_STATUSES, END_EVENTS, STORE_ERRORS, NewJob, Store, public_status
from .submission import SubmitError, read_submission, too_large
from .webhooks import WebhookPolicy, WebhookRefused, WebhookSender
from .worker import enqueue, queue_depth

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots: the runs' keys are "<id>.<run>"
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
MAX_IDEMPOTENCY_KEY = 255
KEEP_ALIVE_SECONDS = 15  # an SSE comment this often: proxies that cut idle connections (60 s) see traffic
STORE_RETRY_AFTER_SECONDS = 5


@dataclass
class Services:
    store: Store
    pool: ArqRedis
    token: str
    webhook_policy: WebhookPolicy
    webhooks: WebhookSender
    server: ServerDescription
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set on SIGTERM: event streams end


def error(code: int, type_: str, message: str, field: str | None = None, headers: dict | None = None,
          **extra) -> web.Response:
    return web.json_response({"code": code, "type": type_, "message": message, "field": field, **extra},
                             status=code, headers=headers)


def create_app(services: Services, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_errors, _auth])
    app["services"] = services
    app["max_request_bytes"] = max_request_bytes
    app.router.add_post("/jobs", submit)
    app.router.add_put("/jobs/{id}", submit)
    app.router.add_get("/jobs/{id}", status)
    app.router.add_get("/jobs/{id}/events", events)
    app.router.add_get("/jobs/{id}/result", result)
    app.router.add_post("/jobs/{id}/cancel", cancel)
    app.router.add_get("/ping", ping)
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:  # aiohttp's, reading a JSON body
        refused = too_large(request.app["max_request_bytes"])
        return web.json_response(refused.body, status=refused.body["code"])
    except web.HTTPException as http:
        if http.status < 400:
            raise
        # Allow: the methods a path takes, with a 405 (RFC 9110)
        return error(http.status, http.reason.replace(" ", ""), http.text or http.reason,
                     headers={name: http.headers[name] for name in ("Allow",) if name in http.headers})
    except SubmitError as refused:
        return web.json_response(refused.body, status=refused.body["code"])
    except STORE_ERRORS as failure:
        return store_unavailable(failure)


def store_unavailable(failure: Exception) -> web.Response:
    return error(503, "StoreUnavailable", f"the job store cannot be reached ({type(failure).__name__}); send the "
                 f"request again in {STORE_RETRY_AFTER_SECONDS} s", None,
                 headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})


@web.middleware
async def _auth(request: web.Request, handler):
    if request.path.startswith("/jobs") and not token_matches(request.headers.get("Authorization"),
                                                                request.app["services"].token):
        return error(401, "Unauthorized", "send Authorization: Bearer <token> (the jobs service's token file)",
                     "Authorization")
    return await handler(request)


def _urls(job_id: str) -> dict:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "result": f"{base}/result", "cancel": f"{base}/cancel"}


async def submit(request: web.Request) -> web.Response:
    services: Services = request.app["services"]
    given_id = request.match_info.get("id")
    if given_id is not None and not JOB_ID.fullmatch(given_id):
        return error(400, "ParamError", "a job id is 1 to 64 letters, digits, '-' or '_'", "id")
    idempotency = request.headers.get("Idempotency-Key")
    if idempotency is not None and not 0 < len(idempotency) <= MAX_IDEMPOTENCY_KEY:
        return error(400, "ParamError", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                     "Idempotency-Key")
    submission = await read_submission(request, request.app["max_request_bytes"], services.server.limits)
    if submission.webhook is not None:
        try:
            await services.webhook_policy.check_url(submission.webhook)
        except WebhookRefused as refused:
            return error(400, "WebhookRefused", str(refused), "webhook")
    job_id = given_id or uuid.uuid4().hex
    created = await services.store.create(
        NewJob(job_id, submission.body, submission.content_type, submission.fingerprint, submission.response,
               submission.webhook, submission.webhook_events),
        idempotency and hashlib.sha256(idempotency.encode()).hexdigest())
    if not created.same_request:
        if created.outcome == "replayed":
            return error(422, "IdempotencyKeyReused", "this Idempotency-Key was used for another request",
                         "Idempotency-Key")
        return error(409, "Conflict", f"job {job_id} exists with another request", "id")
    if created.outcome == "created":
        await enqueue(services.pool, job_id)
    record = await services.store.get(created.id)
    new = created.outcome == "created"
    if new and record is not None:
        services.webhooks.notify(record, "queued", {**public_status(record), "event_data": {}})
    code = 202 if given_id is None else (201 if new else 200)
    headers = {"Location": f"/jobs/{created.id}"}
    if not new:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response({"id": created.id, "status": record["status"] if record else "queued",
                              "urls": _urls(created.id)}, status=code, headers=headers)


async def _record(request: web.Request) -> dict:
    job_id = request.match_info["id"]
    record = await request.app["services"].store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if record is None:
        raise web.HTTPNotFound(text=f"no job {job_id}: never submitted, or expired")
    return record


async def status(request: web.Request) -> web.Response:
    return web.json_response(public_status(await _record(request)))


async def result(request: web.Request) -> web.Response:
    record = await _record(request)
    if record["status"] == "failed":  # what the predictions endpoint would have answered
        failure = json.loads(record["error"])
        return web.json_response(failure, status=failure["code"])
    stored = await request.app["services"].store.result(record["id"]) if record["status"] == "succeeded" else None
    if stored is None:
        return error(409, "NotReady", f"the job is {record['status']}: no result", None, status=record["status"])
    body, content_type, headers = stored
    return web.Response(body=body, content_type=content_type, headers=headers)


async def cancel(request: web.Request) -> web.Response:
    services: Services = request.app["services"]
    record = await _record(request)
    job_id = record["id"]
    if record["status"] in ACTIVE_STATUSES:
        # ends the job and stops the run holding it, in one step: no run that begins later takes it
        if await services.store.finish(job_id, "canceled", {"id": job_id}):
            record = await services.store.get(job_id)
            services.webhooks.notify(record, END_EVENTS["canceled"], {**public_status(record), "event_data": {}})
    return web.json_response(public_status(await services.store.get(job_id) or record), status=202)


async def events(request: web.Request) -> web.StreamResponse:
    services: Services = request.app["services"]
    record = await _record(request)
    after = request.headers.get("Last-Event-ID", "0")
    if not _is_stream_id(after):  # what the client sent is no event id of ours: from the first
        after = "0"
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await _send_events(response, services, record["id"], after)
    except ConnectionResetError:  # the client went away: nothing to do, the job goes on
        pass
    except STORE_ERRORS:  # the store went away mid-stream: the stream ends, the client resumes with its last id
        pass
    return response


def _is_stream_id(text: str) -> bool:
    """A Redis stream id: two unsigned 64-bit numbers (a larger one makes Redis refuse the read mid-stream)."""
    return bool(EVENT_ID.fullmatch(text)) and all(int(number) < 2 ** 64 for number in text.split("-"))


async def _send_events(response: web.StreamResponse, services: Services, job_id: str, after: str) -> None:
    store = services.store
    while True:
        current = await store.get(job_id)
        if current is None:
            return  # expired meanwhile
        # An ended job's events are all written (its end event with its status): read without waiting, and stop
        # when none is left after Last-Event-ID, even one past the end event. A stopping replica sends what it
        # has and ends the stream.
        ended = current["status"] not in ACTIVE_STATUSES
        waits = not (ended or services.stopping.is_set())
        entries = await _unless_stopping(store.events(job_id, after, block_ms=KEEP_ALIVE_SECONDS * 1000 if waits
                                                      else None), services.stopping)
        if entries is None:
            return
        if not entries:
            if not waits:
                return
            await response.write(b": keep-alive\n\n")
            continue
        for entry_id, event, data in entries:
            await response.write(f"id: {entry_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode())
            after = entry_id
            if event in END_EVENTS.values():
                return


async def _unless_stopping(read, stopping: asyncio.Event):
    """What `read` returns, or None once the replica is stopping."""
    reading, stop = asyncio.ensure_future(read), asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not reading.done():
            reading.cancel()
    return reading.result() if reading.done() and not reading.cancelled() else None


async def ping(request: web.Request) -> web.Response:
    """Liveness: the process answers. Not the store: a Redis that restarts must not restart every replica."""
    return web.json_response({"status": "Healthy"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: the queue's depth, which the cluster's autoscaling follows (deploy/k8s/jobs.yaml)."""
    services: Services = request.app["services"]
    counts = await services.store.count_active()
    lines = ["# HELP style_jobs_queued Jobs waiting for TorchServe.", "# TYPE style_jobs_queued gauge",
             f"style_jobs_queued {counts['queued']}",
             "# HELP style_jobs_running Jobs being run by TorchServe.", "# TYPE style_jobs_running gauge",
             f"style_jobs_running {counts['running']}",
             "# HELP style_jobs_queue_depth Jobs in the task queue, waiting or running.",
             "# TYPE style_jobs_queue_depth gauge", f"style_jobs_queue_depth {await queue_depth(services.pool)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
