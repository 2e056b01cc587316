"""The previous releases of the jobs service, as they left jobs in Redis, for the upgrade's tests
(tests/test_jobs_upgrade.py): their Lua scripts verbatim (a test compares them with the history where the clone
has it), and the few lines of their Python that called them and made the request they stored. `main` before the
object store (6a0b5e4) is the previous release; 2026-12-03's (3712f02) named runs by their attempt.
"""

import hashlib
import json
import time

import redis
from urllib3 import encode_multipart_formdata

PREVIOUS_COMMIT = "6a0b5e4916f28f126e7ebe19c6b36845598b601a"  # jobs/store.py: _HOLDS to _FINISH
DEC03_COMMIT = "3712f02d6de31dc15e0588748af52a0a4c56fe87"  # jobs/store.py: _CREATE and _BEGIN
PREFIX = "style-jobs:"
CANCEL_KEY_PREFIX = PREFIX + "cancel:"
ACTIVE = PREFIX + "active"
EVENTS_KEPT = 2000
END_EVENTS = {"succeeded": "done", "failed": "error", "canceled": "canceled"}
DEFAULT_WEBHOOK_EVENTS = ("done", "error", "canceled")

# --- jobs/store.py of 6a0b5e4, verbatim ---------------------------------------------------------------------------

_HOLDS = """
local function active()
  local status = redis.call('HGET', KEYS[1], 'status')
  return status == 'queued' or status == 'running'
end
local function holds(run)
  return active() and (redis.call('HGET', KEYS[1], 'run') or '') == run
end
"""

_CREATE = """
local job, request, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, fingerprint, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', ARGV[8] .. existing) == 1 then
    return {'replayed', existing, redis.call('HGET', ARGV[8] .. existing, 'fingerprint')}
  end
end
if redis.call('EXISTS', job) == 1 then
  return {'exists', id, redis.call('HGET', job, 'fingerprint')}
end
redis.call('HSET', job, 'id', id, 'status', 'queued', 'created_at', ARGV[4], 'fingerprint', fingerprint,
           'attempts', 0, 'run', '', 'job', ARGV[5], 'idempotency', idem)
redis.call('HSET', request, 'body', ARGV[6], 'content_type', ARGV[7])
redis.call('XADD', events, '*', 'event', 'queued', 'data', ARGV[9])
redis.call('SADD', KEYS[5], id)
if idem ~= '' then redis.call('SET', idem, id, 'EX', retention) end
return {'created', id, fingerprint}
"""

# KEYS: job, lease; ARGV: run, owner, lease ms, now (epoch s), the job's time limit (s)
_BEGIN = _HOLDS + """
if not active() then return {'ended'} end
if (redis.call('HGET', KEYS[1], 'run') or '') ~= '' then return {'held'} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'owner', ARGV[2])
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if not deadline then
  deadline = tostring(tonumber(ARGV[4]) + tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'deadline', deadline)
end
return {'began', redis.call('HGET', KEYS[1], 'attempts') or '0', deadline,
        redis.call('HGET', KEYS[1], 'retried_after') or ''}
"""

# KEYS: job, lease; ARGV: run, lease ms
_RENEW = _HOLDS + """
if not holds(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# TorchServe took the run's request: the job is running. KEYS: job, events; ARGV: run, now, started event data
_ACCEPT = _HOLDS + """
if not holds(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
redis.call('HDEL', KEYS[1], 'retried_after')
redis.call('XADD', KEYS[2], '*', 'event', 'started', 'data', ARGV[3])
return 1
"""

# KEYS: job, events; ARGV: run, progress (the status's), progress event data, events kept
_PROGRESS = _HOLDS + """
if not holds(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'progress', 'data', ARGV[3])
return 1
"""

# The run gives the job back to the queue: this replica is stopping (not counted), TorchServe's run broke off
# (counted), or its lease lapsed (recovery, only while no lease is left). Its cancel key stops what TorchServe
# may still compute for it. KEYS: job, lease, the run's cancel key; ARGV: run, why (an error body), counts
# ('1' or '0'), retention, only when the lease has lapsed ('1' or '0')
_RELEASE = _HOLDS + """
if not holds(ARGV[1]) then return 0 end
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'run', '', 'owner', '', 'retried_after', ARGV[2])
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
return 1
"""

# End an active job: by the run holding it (ARGV[11] its run), or canceled by a client (ARGV[11] ''), which also
# stops the run holding it. KEYS: job, request, result, events, active, lease; ARGV: id, status, now, error,
# result body, result type, result headers, retention, event, event data, run, cancel key prefix
_FINISH = _HOLDS + """
if not active() then return 0 end
local run = redis.call('HGET', KEYS[1], 'run') or ''
local by_client = ARGV[11] == ''
if not by_client and run ~= ARGV[11] then return 0 end
local retention = tonumber(ARGV[8])
if by_client and run ~= '' then redis.call('SET', ARGV[12] .. ARGV[1] .. '.' .. run, '1', 'EX', retention) end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4], 'run', '', 'owner', '')
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], 'body', ARGV[5], 'content_type', ARGV[6], 'headers', ARGV[7])
end
redis.call('DEL', KEYS[2], KEYS[6])
redis.call('XADD', KEYS[4], '*', 'event', ARGV[9], 'data', ARGV[10])
redis.call('SREM', KEYS[5], ARGV[1])
for _, key in ipairs({KEYS[1], KEYS[3], KEYS[4]}) do redis.call('EXPIRE', key, retention) end
local idem = redis.call('HGET', KEYS[1], 'idempotency')
if idem and idem ~= '' then redis.call('EXPIRE', idem, retention) end
return 1
"""

# --- jobs/store.py of 3712f02 (2026-12-03), verbatim but for the names ------------------------------------------

DEC03_CREATE = """
local job, request, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, fingerprint, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', ARGV[8] .. existing) == 1 then
    return {'replayed', existing, redis.call('HGET', ARGV[8] .. existing, 'fingerprint')}
  end
end
if redis.call('EXISTS', job) == 1 then
  return {'exists', id, redis.call('HGET', job, 'fingerprint')}
end
redis.call('HSET', job, 'id', id, 'status', 'queued', 'created_at', ARGV[4], 'fingerprint', fingerprint,
           'attempt', 0, 'job', ARGV[5], 'idempotency', idem)
redis.call('HSET', request, 'body', ARGV[6], 'content_type', ARGV[7])
redis.call('XADD', events, '*', 'event', 'queued', 'data', ARGV[9])
redis.call('SADD', KEYS[5], id)
if idem ~= '' then redis.call('SET', idem, id, 'EX', retention) end
return {'created', id, fingerprint}
"""

DEC03_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return -1 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
return attempt
"""

# --- what called them: jobs/store.py's Store, jobs/api.py's submit, jobs/submission.py of 6a0b5e4 ----------------

JOB_FIELDS = ("webhook", "webhook_events")
TEXT_FIELDS = ("params", "response", *JOB_FIELDS)


def key(kind: str, job_id: str) -> str:
    return f"{PREFIX}{kind}:{job_id}"


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def multipart_submission(parts: list[tuple[str, str | None, bytes, str | None]]) -> tuple[bytes, str, str, dict]:
    """_from_multipart of the previous release: `parts` as a client sent them, (name, file name or None for a
    plain field, bytes, content type); the request it stored, its content type, its fingerprint, and the text
    fields it read."""
    fields, digest, texts = [], hashlib.sha256(), {}
    for name, filename, data, content_type in parts:
        if filename is not None:
            digest.update(f"{name}\0file\0{len(data)}\0".encode() + data)
        else:  # text as it was read before, so that a job submitted again finds its fingerprint the same
            value = data.decode("utf-8", "surrogateescape")
            digest.update(f"{name}\0text\0{len(value)}\0{value}".encode("utf-8", "surrogateescape"))
        if name in TEXT_FIELDS:
            texts[name] = data.decode("utf-8", "replace")
        if name not in JOB_FIELDS and name != "stream":
            fields.append((name, data if filename is None else (filename or name, data, content_type)))
    fields.append(("stream", "true"))
    body, content_type = encode_multipart_formdata(fields)
    return body, content_type, digest.hexdigest(), texts


def json_submission(body: dict) -> tuple[bytes, str, str]:
    """_from_json of the previous release: the request it stored, its content type, its fingerprint."""
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body = dict(body)
    body.pop("webhook", None), body.pop("webhook_events", None)
    if isinstance(body.get("params", {}), dict):
        body["params"] = {**body.get("params", {}), "stream": True}
    return json.dumps(body).encode(), "application/json", fingerprint


class PreviousRelease:
    """What a replica of a previous release wrote to Redis: a submit (Store.create, then the job queued in arq's
    default queue under its id), and a run's begin, acceptance by TorchServe, progress and end."""

    def __init__(self, redis_url: str, retention_seconds: int, owner: str = "previous-replica"):
        self.redis_url, self.retention, self.owner = redis_url, retention_seconds, owner
        self.redis = redis.Redis.from_url(redis_url)
        (self._create, self._begin, self._accept, self._progress, self._finish, self._dec03_create,
         self._dec03_begin) = (self.redis.register_script(script) for script in (
            _CREATE, _BEGIN, _ACCEPT, _PROGRESS, _FINISH, DEC03_CREATE, DEC03_BEGIN))

    def submit(self, job_id: str, stored: tuple[bytes, str, str], response: str = "image", webhook: str | None = None,
               webhook_events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS, idempotency_key: str | None = None,
               dec03: bool = False) -> str:
        """`stored`: the request, its content type and fingerprint (multipart_submission, json_submission)."""
        body, content_type, fingerprint = stored
        job_json = json.dumps({"response": response, "webhook": webhook, "webhook_events": list(webhook_events)})
        idem = idempotency_key and f"{PREFIX}idempotency:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        outcome, _, _ = (self._dec03_create if dec03 else self._create)(
            keys=[key("job", job_id), key("request", job_id), key("events", job_id), idem or "", ACTIVE],
            args=[job_id, fingerprint, self.retention, now_iso(), job_json, body, content_type, PREFIX + "job:",
                  json.dumps({"id": job_id, "status": "queued"})])
        self.enqueue(job_id)
        return outcome.decode()

    def ran(self, job_id: str, stored: tuple[bytes, str, str], result: tuple[bytes, str, dict]) -> None:
        """A job a replica took in and ran to success, in one transaction (so that no look of another replica
        falls between its steps): queued, begun by a run, ended with `result`."""
        body, content_type, fingerprint = stored
        job_json = json.dumps({"response": "image", "webhook": None, "webhook_events": list(DEFAULT_WEBHOOK_EVENTS)})
        with self.redis.pipeline(transaction=True) as pipe:
            self._create(keys=[key("job", job_id), key("request", job_id), key("events", job_id), "", ACTIVE],
                         args=[job_id, fingerprint, self.retention, now_iso(), job_json, body, content_type,
                               PREFIX + "job:", json.dumps({"id": job_id, "status": "queued"})], client=pipe)
            self._begin(keys=[key("job", job_id), key("lease", job_id)],
                        args=["run", self.owner, 15_000, time.time(), 3600], client=pipe)
            self._finish(keys=[key("job", job_id), key("request", job_id), key("result", job_id),
                               key("events", job_id), ACTIVE, key("lease", job_id)],
                         args=[job_id, "succeeded", now_iso(), "", result[0], result[1], json.dumps(result[2]),
                               self.retention, "done", json.dumps({"id": job_id}), "run", CANCEL_KEY_PREFIX],
                         client=pipe)
            assert pipe.execute()[-1] == 1

    def enqueue(self, job_id: str) -> None:
        import asyncio

        from arq.connections import ArqRedis

        async def queued():
            pool = ArqRedis.from_url(self.redis_url)
            await pool.enqueue_job("run_job", job_id, _job_id=job_id)
            await pool.aclose()

        asyncio.run(queued())

    def begin(self, job_id: str, run: str, lease_seconds: float = 15, timeout_seconds: float = 3600) -> bool:
        outcome, *_ = self._begin(keys=[key("job", job_id), key("lease", job_id)],
                                  args=[run, self.owner, int(lease_seconds * 1000), time.time(), timeout_seconds])
        return outcome == b"began"

    def dec03_begin(self, job_id: str) -> int:
        """2026-12-03's begin_attempt: the attempt's number, which named its run (`{id}.{n}`)."""
        return int(self._dec03_begin(keys=[key("job", job_id)], args=[self.owner, now_iso()]))

    def accept(self, job_id: str, run: str, started: dict) -> bool:
        return bool(self._accept(keys=[key("job", job_id), key("events", job_id)],
                                 args=[run, now_iso(), json.dumps(started)]))

    def record_progress(self, job_id: str, run: str, progress: dict) -> bool:
        state = json.dumps({name: value for name, value in progress.items() if name not in ("event", "preview")})
        return bool(self._progress(keys=[key("job", job_id), key("events", job_id)],
                                   args=[run, state, json.dumps(progress), EVENTS_KEPT]))

    def finish(self, job_id: str, status: str, data: dict, error: dict | None = None,
               result: tuple[bytes, str, dict] | None = None, run: str | None = None) -> bool:
        body, content_type, headers = result or (b"", "", {})
        return bool(self._finish(
            keys=[key("job", job_id), key("request", job_id), key("result", job_id), key("events", job_id), ACTIVE,
                  key("lease", job_id)],
            args=[job_id, status, now_iso(), json.dumps(error) if error else "", body, content_type,
                  json.dumps(headers), self.retention, END_EVENTS[status], json.dumps(data), run or "",
                  CANCEL_KEY_PREFIX]))
