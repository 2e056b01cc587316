"""Every job's state in Redis, so that any replica answers for any job and a restarted one loses nothing.

Keys (all under style-jobs:, the queue itself is arq's):
  job:{id}          hash: status, times, progress, error, what the result should be, webhook; `run`: the run that
                    holds the job ('' when none), `owner` its replica; `attempts`: runs that broke off and count
                    (TorchServe's worker died, its stream was cut); `deadline`: when its time is up (epoch s);
                    `retried_after`: the error that cut the run before short, for the next `started` event
  lease:{id}        the run holding the job; expires unless that run renews it (worker.py)
  request:{id}      hash: the body to send to TorchServe and its content type; deleted when the job ends
  result:{id}       hash: the answer's body, content type and headers
  events:{id}       stream: queued, started, progress, done, error, canceled (what GET .../events replays)
  idempotency:{sha} the job an Idempotency-Key made
  cancel:{id}.{run} set to stop run `run` in TorchServe: the worker's handler reads it (handler/cancellation.py)
  active            set of the ids not yet ended, which the recovery loop (worker.py) looks after

A run is one execution of a job, named by a random token that is never used again: the header X-Style-Job-Id
and the cancel key are `{id}.{run}`, so stopping one run never stops another. Every change of a job is one of
the Lua scripts below, the transitions, each atomic: a run changes its job only while it still holds it
(`run` is its own and the job has not ended), so a run that lost its lease, or whose job was canceled, changes
nothing. Whoever takes a run's job away (a cancel, the recovery of a lapsed lease) sets that run's cancel key
in the same step. When a job ends, everything it left expires after the retention time.
"""

import json
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

PREFIX = "style-jobs:"
CANCEL_KEY_PREFIX = PREFIX + "cancel:"  # the same as handler/cancellation.py's (a test checks)
ACTIVE = PREFIX + "active"
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
ACTIVE_STATUSES = ("queued", "running")
END_EVENTS = {"succeeded": "done", "failed": "error", "canceled": "canceled"}
EVENTS = ("queued", "started", "progress", "done", "error", "canceled")
EVENTS_KEPT = 2000  # progress events of one job kept for replay (about 15 minutes of them)
# What the store answers while it restarts, fails over or cannot be reached (BusyLoadingError, Redis loading its
# append-only file, is a ConnectionError; ReadOnlyError: a replica not yet promoted): wait and try again.
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
# Redis evicts keys under memory pressure unless maxmemory-policy is noeviction: it would drop queued jobs,
# leases (a live run taken for dead), results.
SAFE_EVICTION_POLICY = "noeviction"

# Every transition's KEYS[1] is the job's hash; `holds(run)`: the job is active and `run` holds it.
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


def key(kind: str, job_id: str) -> str:
    return f"{PREFIX}{kind}:{job_id}"


def cancel_key(job_id: str, run: str) -> str:
    return f"{CANCEL_KEY_PREFIX}{job_id}.{run}"


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


@dataclass(frozen=True)
class NewJob:
    id: str
    body: bytes  # what goes to TorchServe (stream=true set, webhook fields taken out)
    content_type: str
    fingerprint: str  # of what the client sent: the same id or Idempotency-Key with another body is a conflict
    response: str  # "image" or "json": what GET .../result returns
    webhook: str | None
    webhook_events: tuple[str, ...]


@dataclass(frozen=True)
class Created:
    outcome: str  # "created", "exists" (the id was taken), "replayed" (the Idempotency-Key's job)
    id: str
    same_request: bool


@dataclass(frozen=True)
class Began:
    """A run that now holds its job."""
    attempts: int  # runs of the job that broke off and counted, before this one
    deadline: float  # epoch s: the job's time is up (set when its first run began)
    retried_after: dict | None  # what cut the run before short, if one was


class Store:
    def __init__(self, redis: Redis, stream_redis: Redis, retention_seconds: int):
        """`stream_redis`: a client whose socket timeout outlasts a blocking read of events (events())."""
        self.redis, self.stream_redis, self.retention = redis, stream_redis, retention_seconds
        self._create, self._begin, self._renew, self._accept, self._progress, self._release, self._finish = (
            redis.register_script(script) for script in (_CREATE, _BEGIN, _RENEW, _ACCEPT, _PROGRESS, _RELEASE,
                                                          _FINISH))

    async def create(self, job: NewJob, idempotency_key: str | None) -> Created:
        job_json = json.dumps({"response": job.response, "webhook": job.webhook,
                               "webhook_events": list(job.webhook_events)})
        idem = idempotency_key and f"{PREFIX}idempotency:{idempotency_key}"
        outcome, job_id, fingerprint = await self._create(
            keys=[key("job", job.id), key("request", job.id), key("events", job.id), idem or "", ACTIVE],
            args=[job.id, job.fingerprint, self.retention, now_iso(), job_json, job.body, job.content_type,
                  PREFIX + "job:", json.dumps({"id": job.id, "status": "queued"})])
        return Created(outcome.decode(), job_id.decode(), (fingerprint or b"").decode() == job.fingerprint)

    async def get(self, job_id: str) -> dict | None:
        raw = await self.redis.hgetall(key("job", job_id))
        return {name.decode(): value.decode() for name, value in raw.items()} if raw else None

    async def request(self, job_id: str) -> tuple[bytes, str] | None:
        body, content_type = await self.redis.hmget(key("request", job_id), "body", "content_type")
        return None if body is None else (body, content_type.decode())

    async def result(self, job_id: str) -> tuple[bytes, str, dict] | None:
        body, content_type, headers = await self.redis.hmget(key("result", job_id), "body", "content_type", "headers")
        return None if body is None else (body, content_type.decode(), json.loads(headers))

    # --- the transitions of a run (worker.py) ---
    async def begin(self, job_id: str, run: str, owner: str, lease_seconds: float,
                    timeout_seconds: float) -> Began | None:
        """Run `run` takes the job and its lease; None when the job has ended or another run holds it."""
        outcome, *fields = await self._begin(keys=[key("job", job_id), key("lease", job_id)],
                                             args=[run, owner, int(lease_seconds * 1000), time.time(),
                                                   timeout_seconds])
        if outcome != b"began":
            return None
        attempts, deadline, retried_after = (field.decode() for field in fields)
        return Began(int(attempts), float(deadline), json.loads(retried_after) if retried_after else None)

    async def renew(self, job_id: str, run: str, lease_seconds: float) -> bool:
        """Extend the run's lease; False when the run no longer holds its job."""
        return bool(await self._renew(keys=[key("job", job_id), key("lease", job_id)],
                                      args=[run, int(lease_seconds * 1000)]))

    async def lease_held(self, job_id: str) -> bool:
        return bool(await self.redis.exists(key("lease", job_id)))

    async def accept(self, job_id: str, run: str, started: dict) -> bool:
        """TorchServe took the run's request: the job is `running`, with the `started` event."""
        return bool(await self._accept(keys=[key("job", job_id), key("events", job_id)],
                                       args=[run, now_iso(), json.dumps(started)]))

    async def record_progress(self, job_id: str, run: str, progress: dict) -> bool:
        state = json.dumps({name: value for name, value in progress.items() if name not in ("event", "preview")})
        return bool(await self._progress(keys=[key("job", job_id), key("events", job_id)],
                                         args=[run, state, json.dumps(progress), EVENTS_KEPT]))

    async def release(self, job_id: str, run: str, why: dict, counts: bool, only_if_lapsed: bool = False) -> bool:
        """Give the job back to the queue, `why` for the next run's `started` event; the run's cancel key stops
        what TorchServe may still compute for it. `counts`: it used up an attempt. `only_if_lapsed`: only if
        the run's lease has run out (the recovery of a run whose replica stopped renewing it)."""
        return bool(await self._release(
            keys=[key("job", job_id), key("lease", job_id), cancel_key(job_id, run)],
            args=[run, json.dumps(why), int(counts), self.retention, int(only_if_lapsed)]))

    async def stop_run(self, job_id: str, run: str) -> None:
        """Stop what TorchServe computes for a run that no longer holds its job."""
        await self.redis.set(cancel_key(job_id, run), "1", ex=self.retention)

    async def finish(self, job_id: str, status: str, data: dict, error: dict | None = None,
                     result: tuple[bytes, str, dict] | None = None, run: str | None = None) -> bool:
        """End an active job with `status`: by the run `run` while it holds the job, or, without a run, canceled
        by its client. False when it had ended already, or `run` no longer holds it."""
        body, content_type, headers = result or (b"", "", {})
        ended = await self._finish(
            keys=[key("job", job_id), key("request", job_id), key("result", job_id), key("events", job_id), ACTIVE,
                  key("lease", job_id)],
            args=[job_id, status, now_iso(), json.dumps(error) if error else "", body, content_type,
                  json.dumps(headers), self.retention, END_EVENTS[status], json.dumps(data), run or "",
                  CANCEL_KEY_PREFIX])
        return bool(ended)

    # --- reading ---
    async def events(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, str, dict]]:
        """The events after stream id `after` ("0" for all), waiting up to block_ms for one (None: not at all)."""
        found = await self.stream_redis.xread({key("events", job_id): after}, block=block_ms, count=100)
        return [(entry_id.decode(), fields[b"event"].decode(), json.loads(fields[b"data"]))
                for _, entries in found for entry_id, fields in entries]

    async def active_ids(self) -> list[str]:
        return [member.decode() async for member in self.redis.sscan_iter(ACTIVE, count=500)]

    async def forget(self, job_id: str) -> None:
        """Take an id whose record has expired out of the active set."""
        await self.redis.srem(ACTIVE, job_id)

    async def count_active(self) -> dict[str, int]:
        """Active jobs by status, for the metrics (autoscaling on the queue's depth)."""
        counts = dict.fromkeys(ACTIVE_STATUSES, 0)
        for job_id in await self.active_ids():
            status = await self.redis.hget(key("job", job_id), "status")
            if status is not None and status.decode() in counts:
                counts[status.decode()] += 1
        return counts


class StoreRefused(Exception):
    """A Redis this service must not keep jobs in."""


async def check_eviction_policy(redis: Redis) -> None:
    """Raise StoreRefused, saying why, when Redis may evict keys. INFO, not CONFIG GET: managed Redis services
    often disable CONFIG; one that refuses INFO too is warned about."""
    try:
        policy = (await redis.info("memory")).get("maxmemory_policy", SAFE_EVICTION_POLICY)
    except ResponseError as refused:
        logger.warning("jobs: cannot read Redis's maxmemory-policy (%s): make sure it is %s", refused,
                       SAFE_EVICTION_POLICY)
        return
    if policy != SAFE_EVICTION_POLICY:
        raise StoreRefused(f"Redis's maxmemory-policy is {policy}: under memory pressure it would delete keys of "
                           f"queued and running jobs, their leases and results. Set maxmemory-policy "
                           f"{SAFE_EVICTION_POLICY} (and enough maxmemory) for the jobs' Redis")


def public_status(record: dict) -> dict:
    """GET /jobs/{id}'s body (CONTRACT.md)."""
    return {"id": record["id"], "status": record["status"],
            "progress": json.loads(record["progress"]) if record.get("progress") else None,
            "error": json.loads(record["error"]) if record.get("error") else None,
            "created_at": record.get("created_at"), "started_at": record.get("started_at") or None,
            "finished_at": record.get("finished_at") or None}
