"""Every job's state in Redis, so that any replica answers for any job and a restarted one loses nothing. Redis
holds records, events and counters only: the jobs' images are in the object store (objects.py).

A job belongs to the client that submitted it: its key in the store, its `ref`, is `<client>:<id>`, so that
two clients may use the same id and neither ever meets the other's job.

Keys (all under style-jobs:, the queue itself is arq's, named style-jobs:queue; the previous release's keys,
which name a job by its bare id, are upgrade.py's):
  job:{ref}         hash: status, times, progress, error, what the result should be, webhook; `objects`: the
                    prefix of its objects, `request_bytes`/`result_bytes` their sizes, `result_key` the result's;
                    `run`: the run that holds the job ('' when none), `owner` its replica; `attempts`: runs that
                    broke off and count (TorchServe's worker died, its stream was cut); `deadline`: when its
                    time is up (epoch s); `retried_after`: the error that cut the run before short;
                    `checkpoint`/`checkpoint_bytes`: the object of the last segment's checkpoint (worker.py)
  leases            sorted set: the refs of the jobs a run holds, by when that run's lease lapses (ms, Redis's
                    clock) unless the run renews it (worker.py): the recovery finds the lapsed ones in one read
  events:{ref}      stream: queued, started, progress, done, error, canceled (what GET .../events replays)
  idempotency:{client}:{sha}  the job an Idempotency-Key of that client made, until the job's retention ends
  cancel:{ref}.{run}  set to stop run `run` in TorchServe: the worker's handler reads it (handler/cancellation.py)
  active-jobs       sorted set: the refs not yet ended, by `sequence` (the order they came in), which the
                    recovery loop (worker.py) looks over a slice at a time. Not `active`: that is the previous
                    release's set, whose replicas still look over it during a rolling upgrade (upgrade.py)
  sequence          the last number given to a job in active-jobs
  client:{client}   hash: `unfinished` jobs and `stored_bytes` in the object store, for the client's quotas
  counters          hash: the metrics (api.py), kept by the transitions: `queued`, `running`, `stored_bytes`
                    now; `submitted`, `succeeded`, `failed`, `canceled`, `given_back`, `webhooks_*` so far
  expiring          sorted set: the objects of ended jobs, by when they expire with their job (retention.py)
  uploads           sorted set: object prefixes being written by a submit, by when it began; a submit that
                    never made a job (its replica died) leaves one that retention.py deletes
  outbox            sorted set: the webhook deliveries, by when each is due (webhooks.py)
  webhook:{id}      hash: one delivery: its URL, body, job, event, failed tries, when it was made
  upgrade-lock      the replica moving the previous release's jobs to this layout (upgrade.py)

A run is one execution of a job, named by a random token that is never used again: the header X-Style-Job-Id
and the cancel key are `{ref}.{run}`, so stopping one run never stops another. Every change of a job is one of
the Lua scripts below, the transitions, each atomic: a run changes its job only while it still holds it
(`run` is its own and the job has not ended), so a run that lost its lease, or whose job was canceled, changes
nothing. Whoever takes a run's job away (a cancel, the recovery of a lapsed lease) sets that run's cancel key
in the same step. The transitions also keep the counters and quotas, and write the event and the webhook
delivery it makes (the outbox), in the same step as the change they tell of. When a job ends, its record,
events and idempotency key expire after the retention time, and its objects are listed to go with them.
"""

import json
import logging
import time
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

PREFIX = "style-jobs:"
CANCEL_KEY_PREFIX = PREFIX + "cancel:"  # the same as handler/cancellation.py's (a test checks)
ACTIVE = PREFIX + "active-jobs"
SEQUENCE = PREFIX + "sequence"
LEASES = PREFIX + "leases"
COUNTERS = PREFIX + "counters"
EXPIRING = PREFIX + "expiring"
UPLOADS = PREFIX + "uploads"
OUTBOX = PREFIX + "outbox"
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
ACTIVE_STATUSES = ("queued", "running")
END_EVENTS = {"succeeded": "done", "failed": "error", "canceled": "canceled"}
EVENTS = ("queued", "started", "progress", "done", "error", "canceled")
EVENTS_KEPT = 2000  # progress events of one job kept for replay (about 15 minutes of them)
# What the store answers while it restarts, fails over or cannot be reached (BusyLoadingError, Redis loading its
# append-only file, is a ConnectionError; ReadOnlyError: a replica not yet promoted): wait and try again.
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
# Redis evicts keys under memory pressure unless maxmemory-policy is noeviction: it would drop queued jobs,
# leases (a live run taken for dead), results' records.
SAFE_EVICTION_POLICY = "noeviction"

# Shared by every transition (and upgrade.py's step): KEYS[1] is the job's hash. `event` appends an event to the
# job's stream and, when the job's webhook asked for it, writes its delivery to the outbox; the body is the job's
# status as GET /jobs/{id} answers it (its JSON fields copied as they are stored) with the event's data.
# `enlist` adds a job to the active jobs, after the last; `server_ms` is Redis's clock (leases run on it, so
# that replicas' clocks never disagree about them).
LUA_LIB = f"""
local P = '{PREFIX}'
local COUNTERS = '{COUNTERS}'
local function active()
  local status = redis.call('HGET', KEYS[1], 'status')
  return status == 'queued' or status == 'running'
end
local function holds(run)
  return active() and (redis.call('HGET', KEYS[1], 'run') or '') == run
end
local function count(field, by)
  redis.call('HINCRBY', COUNTERS, field, by)
end
local function enlist(active, ref)
  redis.call('ZADD', active, redis.call('INCR', '{SEQUENCE}'), ref)
end
local function server_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
local function json_string(value)
  if value and value ~= '' then return cjson.encode(value) end
  return 'null'
end
local function json_value(value)
  if value and value ~= '' then return value end
  return 'null'
end
local function event(stream, name, data, delivery, now, kept)
  if kept then
    redis.call('XADD', stream, 'MAXLEN', '~', kept, '*', 'event', name, 'data', data)
  else
    redis.call('XADD', stream, '*', 'event', name, 'data', data)
  end
  local hook = redis.call('HGET', KEYS[1], 'webhook')
  if not hook or hook == '' then return end
  local settings = cjson.decode(hook)
  for _, wanted in ipairs(settings.events) do
    if wanted == name then
      local f = redis.call('HMGET', KEYS[1], 'id', 'status', 'progress', 'error', 'created_at', 'started_at',
                           'finished_at', 'client')
      local body = '{{"event": ' .. cjson.encode(name) .. ', "job": {{"id": ' .. cjson.encode(f[1]) ..
        ', "status": ' .. cjson.encode(f[2]) .. ', "progress": ' .. json_value(f[3]) .. ', "error": ' ..
        json_value(f[4]) .. ', "created_at": ' .. json_string(f[5]) .. ', "started_at": ' .. json_string(f[6]) ..
        ', "finished_at": ' .. json_string(f[7]) .. ', "event_data": ' .. data .. '}}}}'
      redis.call('HSET', P .. 'webhook:' .. delivery, 'url', settings.url, 'body', body, 'client', f[8],
                 'job', f[1], 'event', name, 'tries', 0, 'created', now)
      redis.call('ZADD', P .. 'outbox', now, delivery)
      count('webhooks_queued', 1)
      return
    end
  end
end
"""

# KEYS: job, events, idempotency ('' when none), active, client; ARGV: id, client, fingerprint, now (ISO),
# response, webhook settings (JSON or ''), objects prefix, request bytes, request content type, the queued
# event's data, a delivery id, now (epoch s), the client's most unfinished jobs, the service's, the client's
# most stored bytes
_CREATE = LUA_LIB + """
local job, idem = KEYS[1], KEYS[3]
local id, client = ARGV[1], ARGV[2]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', P .. 'job:' .. client .. ':' .. existing) == 1 then
    return {'replayed', existing, redis.call('HGET', P .. 'job:' .. client .. ':' .. existing, 'fingerprint')}
  end
end
if redis.call('EXISTS', job) == 1 then
  return {'exists', id, redis.call('HGET', job, 'fingerprint')}
end
local size = tonumber(ARGV[8])
if tonumber(redis.call('HGET', KEYS[5], 'unfinished') or '0') >= tonumber(ARGV[13]) then
  return {'quota', 'client_jobs'}
end
local unfinished = tonumber(redis.call('HGET', COUNTERS, 'queued') or '0') +
                   tonumber(redis.call('HGET', COUNTERS, 'running') or '0')
if unfinished >= tonumber(ARGV[14]) then return {'quota', 'service_jobs'} end
if tonumber(redis.call('HGET', KEYS[5], 'stored_bytes') or '0') + size > tonumber(ARGV[15]) then
  return {'quota', 'client_bytes'}
end
redis.call('HSET', job, 'id', id, 'client', client, 'status', 'queued', 'created_at', ARGV[4],
           'fingerprint', ARGV[3], 'attempts', 0, 'run', '', 'response', ARGV[5], 'webhook', ARGV[6],
           'idempotency', idem, 'objects', ARGV[7], 'request_bytes', size, 'request_type', ARGV[9])
redis.call('HINCRBY', KEYS[5], 'unfinished', 1)
redis.call('HINCRBY', KEYS[5], 'stored_bytes', size)
count('queued', 1)
count('submitted', 1)
count('stored_bytes', size)
enlist(KEYS[4], client .. ':' .. id)
redis.call('ZREM', P .. 'uploads', ARGV[7])
if idem ~= '' then redis.call('SET', idem, id) end
event(KEYS[2], 'queued', ARGV[10], ARGV[11], ARGV[12])
return {'created', id, ARGV[3]}
"""

# KEYS: job, leases; ARGV: run, owner, lease ms, now (epoch s), the job's time limit (s), ref
_BEGIN = LUA_LIB + """
if not active() then return {'ended'} end
if (redis.call('HGET', KEYS[1], 'run') or '') ~= '' then return {'held'} end
redis.call('ZADD', KEYS[2], server_ms() + tonumber(ARGV[3]), ARGV[6])
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'owner', ARGV[2])
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if not deadline then
  deadline = tostring(tonumber(ARGV[4]) + tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'deadline', deadline)
end
return {'began', redis.call('HGET', KEYS[1], 'attempts') or '0', deadline,
        redis.call('HGET', KEYS[1], 'retried_after') or ''}
"""

# KEYS: job, leases; ARGV: run, lease ms, ref
_RENEW = LUA_LIB + """
if not holds(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], server_ms() + tonumber(ARGV[2]), ARGV[3])
return 1
"""

# TorchServe took the run's request: the job is running. KEYS: job, events; ARGV: run, now (ISO), started event
# data, a delivery id, now (epoch s)
# A job's next segment goes on running: no second `started` event.
_ACCEPT = LUA_LIB + """
if not holds(ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 1 end
count('queued', -1)
count('running', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
redis.call('HDEL', KEYS[1], 'retried_after')
event(KEYS[2], 'started', ARGV[3], ARGV[4], ARGV[5])
return 1
"""

# KEYS: job, events; ARGV: run, progress (the status's), progress event data, events kept, a delivery id, now
_PROGRESS = LUA_LIB + """
if not holds(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
event(KEYS[2], 'progress', ARGV[3], ARGV[5], ARGV[6], ARGV[4])
return 1
"""

# The run gives the job back to the queue: this replica is stopping (not counted), TorchServe's run broke off
# (counted), or its lease lapsed (recovery, only while no lease is left). Its cancel key stops what TorchServe
# may still compute for it. KEYS: job, leases, the run's cancel key; ARGV: run, why (an error body), counts
# ('1' or '0'), retention, only when the lease has lapsed ('1' or '0'), ref
_RELEASE = LUA_LIB + """
if not holds(ARGV[1]) then return 0 end
if ARGV[5] == '1' and tonumber(redis.call('ZSCORE', KEYS[2], ARGV[6]) or '0') > server_ms() then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  count('running', -1)
  count('queued', 1)
end
count('given_back', 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'run', '', 'owner', '', 'retried_after', ARGV[2])
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
return 1
"""

# A segment of the run ended with iterations left: its checkpoint is the job's, and the run lets the job go (its
# lease too) for the next segment, queued by the caller; the job stays `running`. Returns the previous
# checkpoint's key ('' when none), for the caller to delete, or nothing when the run no longer holds the job.
# KEYS: job, leases, client; ARGV: run, checkpoint key, checkpoint bytes, ref
_SEGMENT = LUA_LIB + """
if not holds(ARGV[1]) then return false end
local previous = redis.call('HGET', KEYS[1], 'checkpoint') or ''
local change = tonumber(ARGV[3]) - tonumber(redis.call('HGET', KEYS[1], 'checkpoint_bytes') or '0')
count('stored_bytes', change)
redis.call('HINCRBY', KEYS[3], 'stored_bytes', change)
redis.call('HSET', KEYS[1], 'checkpoint', ARGV[2], 'checkpoint_bytes', ARGV[3], 'run', '', 'owner', '')
redis.call('ZREM', KEYS[2], ARGV[4])
return previous
"""

# End an active job: by the run holding it (ARGV[11] its run), or canceled by a client (ARGV[11] ''), which also
# stops the run holding it. Its request's and checkpoint's bytes are no longer counted (the caller deletes the
# objects), its result's are until it expires. KEYS: job, events, active, leases, client; ARGV: ref, status, now
# (ISO), error, result key, result bytes, result content type, result headers, retention, event, event data, run,
# a delivery id, now (epoch s)
_FINISH = LUA_LIB + """
if not active() then return 0 end
local run = redis.call('HGET', KEYS[1], 'run') or ''
local by_client = ARGV[12] == ''
if not by_client and run ~= ARGV[12] then return 0 end
local retention = tonumber(ARGV[9])
if by_client and run ~= '' then redis.call('SET', P .. 'cancel:' .. ARGV[1] .. '.' .. run, '1', 'EX', retention) end
count(redis.call('HGET', KEYS[1], 'status'), -1)
count(ARGV[2], 1)
local result_bytes = tonumber(ARGV[6])
local stored = result_bytes - tonumber(redis.call('HGET', KEYS[1], 'request_bytes') or '0') -
               tonumber(redis.call('HGET', KEYS[1], 'checkpoint_bytes') or '0')
count('stored_bytes', stored)
redis.call('HINCRBY', KEYS[5], 'stored_bytes', stored)
redis.call('HINCRBY', KEYS[5], 'unfinished', -1)
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4], 'run', '', 'owner', '',
           'result_key', ARGV[5], 'result_bytes', result_bytes, 'result_type', ARGV[7], 'result_headers', ARGV[8])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'client', 'objects')
redis.call('ZADD', P .. 'expiring', tonumber(ARGV[14]) + retention,
           cjson.encode({client = f[1], objects = f[2], bytes = result_bytes}))
event(KEYS[2], ARGV[10], ARGV[11], ARGV[13], ARGV[14])
for _, key in ipairs({KEYS[1], KEYS[2]}) do redis.call('EXPIRE', key, retention) end
local idem = redis.call('HGET', KEYS[1], 'idempotency')
if idem and idem ~= '' then redis.call('EXPIRE', idem, retention) end
return 1
"""

# The recovery's look over the jobs (worker.py), in one step whatever their number: the runs whose lease has
# lapsed (when `judge`), and, for the jobs at the head of the task queue (where every pick-up happens) and a
# slice of the active jobs after `cursor` (so that every one is looked at in turn), a job no run holds that is
# in no queue (to be queued again) or marked as taken by a pick-up that began no run (the mark deleted, when
# `judge`), a run without a lease (taken as lapsed), and a record that is gone (taken out of the active jobs).
# KEYS: leases, active, queue; ARGV: judge ('1' or '0'), cursor (a sequence number), slice, head, the queue's key
# prefixes of a job and of its pick-up's mark, how long a pick-up's mark lives (ms), the lease (ms). Returns the
# lapsed runs (ref, run, owner), the refs to queue again, the refs whose mark was deleted, how many records were
# gone, the next cursor.
_LOOK_OVER = LUA_LIB + """
local judge, in_queue, picked = ARGV[1] == '1', ARGV[5], ARGV[6]
local lapsed, unqueued, cleared, seen, gone = {}, {}, {}, {}, 0
if judge then
  for _, ref in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', server_ms(), 'LIMIT', 0, tonumber(ARGV[3]))) do
    local f = redis.call('HMGET', P .. 'job:' .. ref, 'status', 'run', 'owner')
    if (f[1] == 'queued' or f[1] == 'running') and (f[2] or '') ~= '' then
      table.insert(lapsed, {ref, f[2], f[3] or ''})
    else
      redis.call('ZREM', KEYS[1], ref)  -- no run holds the job: nothing to lapse
    end
  end
end
local function look_at(ref)
  if seen[ref] then return true end
  seen[ref] = true
  local f = redis.call('HMGET', P .. 'job:' .. ref, 'status', 'run', 'owner')
  if not f[1] then return false end
  if f[1] ~= 'queued' and f[1] ~= 'running' then return true end
  if (f[2] or '') ~= '' then
    if judge and not redis.call('ZSCORE', KEYS[1], ref) then table.insert(lapsed, {ref, f[2], f[3] or ''}) end
    return true
  end
  if redis.call('EXISTS', in_queue .. ref) == 0 then
    table.insert(unqueued, ref)
  elseif judge then
    local left = redis.call('PTTL', picked .. ref)
    if left > 0 and tonumber(ARGV[7]) - left > tonumber(ARGV[8]) then
      redis.call('DEL', picked .. ref)
      table.insert(cleared, ref)
    end
  end
  return true
end
for _, ref in ipairs(redis.call('ZRANGE', KEYS[3], 0, tonumber(ARGV[4]) - 1)) do look_at(ref) end
local slice = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf', 'WITHSCORES', 'LIMIT', 0,
                         tonumber(ARGV[3]))
local cursor = '0'
for i = 1, #slice, 2 do
  if not look_at(slice[i]) then
    redis.call('ZREM', KEYS[2], slice[i])
    gone = gone + 1
  end
  cursor = slice[i + 1]
end
if #slice < 2 * tonumber(ARGV[3]) then cursor = '0' end
return {lapsed, unqueued, cleared, gone, cursor}
"""

# An ended job's objects are gone: no longer counted. KEYS: the expiring set; ARGV: the entry, its client's key
_EXPIRED = LUA_LIB + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local entry = cjson.decode(ARGV[1])
redis.call('HINCRBY', ARGV[2], 'stored_bytes', -entry.bytes)
count('stored_bytes', -entry.bytes)
return 1
"""


def key(kind: str, ref: str) -> str:
    return f"{PREFIX}{kind}:{ref}"


def job_ref(client: str, job_id: str) -> str:
    """A job's key in the store: its client's name and its id."""
    return f"{client}:{job_id}"


def client_key(client: str) -> str:
    return f"{PREFIX}client:{client}"


def cancel_key(ref: str, run: str) -> str:
    return f"{CANCEL_KEY_PREFIX}{ref}.{run}"


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _delivery_id() -> str:
    """A webhook delivery's id (`webhook-id`), the same for every try of it."""
    return f"msg_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Quotas:
    client_unfinished: int
    service_unfinished: int
    client_stored_bytes: int


@dataclass(frozen=True)
class NewJob:
    client: str
    id: str
    objects: str  # its objects' prefix (objects.JobObjects), its request stored under "request"
    request_bytes: int
    content_type: str  # the request's
    fingerprint: str  # of what the client sent: the same id or Idempotency-Key with another body is a conflict
    response: str  # "image" or "json": what GET .../result returns
    webhook: str | None
    webhook_events: tuple[str, ...]

    @property
    def ref(self) -> str:
        return job_ref(self.client, self.id)


@dataclass(frozen=True)
class Created:
    outcome: str  # "created", "exists" (the id was taken), "replayed" (the Idempotency-Key's job), "quota"
    id: str  # for "quota": which quota (client_jobs, service_jobs, client_bytes)
    fingerprint: str  # the job's: the new one's, or the one that took the id or Idempotency-Key


# The fingerprint of a job moved from the previous release (upgrade.py): this prefix and the previous release's
# fingerprint of what its client sent (submission.previous_release_fingerprint).
PREVIOUS_FINGERPRINT = "previous:"


@dataclass(frozen=True)
class Began:
    """A run that now holds its job."""
    attempts: int  # runs of the job that broke off and counted, before this one
    deadline: float  # epoch s: the job's time is up (set when its first run began)
    retried_after: dict | None  # what cut the run before short, if one was


@dataclass(frozen=True)
class TaskQueue:
    """Where the task queue (arq) keeps a job: what the recovery's look-over reads of it."""
    name: str  # its sorted set of queued jobs
    job_prefix: str  # + ref: a queued job
    picked_prefix: str  # + ref: the mark of a pick-up
    picked_ms: int  # how long a mark lives
    head: int  # how far from the head of the queue a pick-up takes jobs


@dataclass(frozen=True)
class LookedOver:
    lapsed: list[tuple[str, str, str]]  # (ref, run, owner) of the runs whose lease has lapsed
    unqueued: list[str]  # jobs that no run holds and no queue has
    cleared: list[str]  # jobs whose mark of a pick-up that began no run was deleted
    gone: int  # refs taken out of the active jobs: their records were gone
    cursor: int  # where the next look-over's slice begins


@dataclass(frozen=True)
class StoredResult:
    key: str  # in the object store
    size: int
    content_type: str
    headers: dict


class Store:
    def __init__(self, redis: Redis, stream_redis: Redis, retention_seconds: int):
        """`stream_redis`: a client whose socket timeout outlasts a blocking read of events (events.py)."""
        self.redis, self.stream_redis, self.retention = redis, stream_redis, retention_seconds
        (self._create, self._begin, self._renew, self._accept, self._progress, self._release, self._segment,
         self._finish, self._expired, self._look_over) = (redis.register_script(script) for script in (
            _CREATE, _BEGIN, _RENEW, _ACCEPT, _PROGRESS, _RELEASE, _SEGMENT, _FINISH, _EXPIRED, _LOOK_OVER))

    async def begin_upload(self, objects: str) -> None:
        """A submit starts writing objects under `objects`: listed until a job takes them (create), so that
        they are deleted if none ever does."""
        await self.redis.zadd(UPLOADS, {objects: time.time()})

    async def end_upload(self, objects: str) -> None:
        """The objects under `objects` were deleted: no longer listed."""
        await self.redis.zrem(UPLOADS, objects)

    async def create(self, job: NewJob, idempotency_key: str | None, quotas: Quotas) -> Created:
        webhook = json.dumps({"url": job.webhook, "events": list(job.webhook_events)}) if job.webhook else ""
        idem = idempotency_key and f"{PREFIX}idempotency:{job.client}:{idempotency_key}"
        outcome, job_id, *fingerprint = await self._create(
            keys=[key("job", job.ref), key("events", job.ref), idem or "", ACTIVE, client_key(job.client)],
            args=[job.id, job.client, job.fingerprint, now_iso(), job.response, webhook, job.objects,
                  job.request_bytes, job.content_type, json.dumps({"id": job.id, "status": "queued"}),
                  _delivery_id(), time.time(), quotas.client_unfinished, quotas.service_unfinished,
                  quotas.client_stored_bytes])
        return Created(outcome.decode(), job_id.decode(), ((fingerprint[0] if fingerprint else b"") or b"").decode())

    async def get(self, ref: str) -> dict | None:
        raw = await self.redis.hgetall(key("job", ref))
        return {name.decode(): value.decode() for name, value in raw.items()} if raw else None

    async def usage(self, client: str) -> dict[str, int]:
        """The client's unfinished jobs and stored bytes."""
        unfinished, stored = await self.redis.hmget(client_key(client), "unfinished", "stored_bytes")
        return {"unfinished": int(unfinished or 0), "stored_bytes": int(stored or 0)}

    async def counters(self) -> dict[str, int]:
        """The metrics' counters: one read, whatever the number of jobs."""
        return {name.decode(): int(value) for name, value in (await self.redis.hgetall(COUNTERS)).items()}

    # --- the transitions of a run (worker.py) ---
    async def begin(self, ref: str, run: str, owner: str, lease_seconds: float,
                    timeout_seconds: float) -> Began | None:
        """Run `run` takes the job and its lease; None when the job has ended or another run holds it."""
        outcome, *fields = await self._begin(keys=[key("job", ref), LEASES],
                                             args=[run, owner, int(lease_seconds * 1000), time.time(),
                                                   timeout_seconds, ref])
        if outcome != b"began":
            return None
        attempts, deadline, retried_after = (field.decode() for field in fields)
        return Began(int(attempts), float(deadline), json.loads(retried_after) if retried_after else None)

    async def renew(self, ref: str, run: str, lease_seconds: float) -> bool:
        """Extend the run's lease; False when the run no longer holds its job."""
        return bool(await self._renew(keys=[key("job", ref), LEASES], args=[run, int(lease_seconds * 1000), ref]))

    async def accept(self, ref: str, run: str, started: dict) -> bool:
        """TorchServe took the run's request: the job is `running`, with the `started` event."""
        return bool(await self._accept(keys=[key("job", ref), key("events", ref)],
                                       args=[run, now_iso(), json.dumps(started), _delivery_id(), time.time()]))

    async def record_progress(self, ref: str, run: str, progress: dict) -> bool:
        state = json.dumps({name: value for name, value in progress.items() if name not in ("event", "preview")})
        return bool(await self._progress(keys=[key("job", ref), key("events", ref)],
                                         args=[run, state, json.dumps(progress), EVENTS_KEPT, _delivery_id(),
                                               time.time()]))

    async def release(self, ref: str, run: str, why: dict, counts: bool, only_if_lapsed: bool = False) -> bool:
        """Give the job back to the queue, `why` for the next run's `started` event; the run's cancel key stops
        what TorchServe may still compute for it. `counts`: it used up an attempt. `only_if_lapsed`: only if
        the run's lease has run out (the recovery of a run whose replica stopped renewing it)."""
        return bool(await self._release(
            keys=[key("job", ref), LEASES, cancel_key(ref, run)],
            args=[run, json.dumps(why), int(counts), self.retention, int(only_if_lapsed), ref]))

    async def end_segment(self, ref: str, run: str, checkpoint_key: str, checkpoint_bytes: int) -> str | None:
        """The run's segment ended with `checkpoint_key`: the job's checkpoint from now on, and the run lets the
        job go for its next segment. The previous checkpoint's key ('' when none), or None when the run no
        longer holds the job (its checkpoint is then nobody's)."""
        client = ref.split(":", 1)[0]
        previous = await self._segment(keys=[key("job", ref), LEASES, client_key(client)],
                                       args=[run, checkpoint_key, checkpoint_bytes, ref])
        return None if previous is None else previous.decode()

    async def stop_run(self, ref: str, run: str) -> None:
        """Stop what TorchServe computes for a run that no longer holds its job."""
        await self.redis.set(cancel_key(ref, run), "1", ex=self.retention)

    async def finish(self, ref: str, status: str, data: dict, error: dict | None = None,
                     result: StoredResult | None = None, run: str | None = None) -> bool:
        """End an active job with `status`: by the run `run` while it holds the job, or, without a run, canceled
        by its client. False when it had ended already, or `run` no longer holds it."""
        client = ref.split(":", 1)[0]
        ended = await self._finish(
            keys=[key("job", ref), key("events", ref), ACTIVE, LEASES, client_key(client)],
            args=[ref, status, now_iso(), json.dumps(error) if error else "", result.key if result else "",
                  result.size if result else 0, result.content_type if result else "",
                  json.dumps(result.headers if result else {}), self.retention, END_EVENTS[status],
                  json.dumps(data), run or "", _delivery_id(), time.time()])
        return bool(ended)

    # --- reading ---
    async def events(self, ref: str, after: str, count: int = 100) -> list[tuple[str, str, dict]]:
        """Up to `count` events after stream id `after` ("0" for all), without waiting."""
        found = await self.redis.xread({key("events", ref): after}, count=count)
        return [(entry_id.decode(), fields[b"event"].decode(), json.loads(fields[b"data"]))
                for _, entries in found for entry_id, fields in entries]

    async def last_event_id(self, ref: str) -> str:
        """The id of the job's last event, "0-0" when it has none."""
        last = await self.redis.xrevrange(key("events", ref), count=1)
        return last[0][0].decode() if last else "0-0"

    async def look_over(self, judge: bool, cursor: int, batch: int, queue: TaskQueue,
                        lease_seconds: float) -> LookedOver:
        """The recovery's look over the jobs (_LOOK_OVER): one call to the store, whatever their number: at most
        `batch` lapsed runs, the head of `queue`, and `batch` active jobs after `cursor`."""
        lapsed, unqueued, cleared, gone, after = await self._look_over(
            keys=[LEASES, ACTIVE, queue.name],
            args=[int(judge), cursor, batch, queue.head, queue.job_prefix, queue.picked_prefix, queue.picked_ms,
                  int(lease_seconds * 1000)])
        return LookedOver([tuple(field.decode() for field in run) for run in lapsed],
                          [ref.decode() for ref in unqueued], [ref.decode() for ref in cleared], gone,
                          int(float(after)))

    # --- what expires (retention.py) ---
    async def due_expiring(self, now: float, count: int) -> list[tuple[str, dict]]:
        """Up to `count` entries of ended jobs' objects whose time has come: (the entry, its fields)."""
        found = await self.redis.zrangebyscore(EXPIRING, "-inf", now, start=0, num=count)
        return [(entry.decode(), json.loads(entry)) for entry in found]

    async def expired(self, entry: str, client: str) -> bool:
        """The entry's objects are deleted: it is taken off, and its bytes no longer counted. False when
        another replica took it first."""
        return bool(await self._expired(keys=[EXPIRING], args=[entry, client_key(client)]))

    async def abandoned_uploads(self, before: float, count: int) -> list[str]:
        """Prefixes of uploads begun before `before` that no job took."""
        return [prefix.decode() for prefix in await self.redis.zrangebyscore(UPLOADS, "-inf", before, start=0,
                                                                             num=count)]


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
    """GET /jobs/{id}'s body (docs/jobs.md)."""
    return {"id": record["id"], "status": record["status"],
            "progress": json.loads(record["progress"]) if record.get("progress") else None,
            "error": json.loads(record["error"]) if record.get("error") else None,
            "created_at": record.get("created_at"), "started_at": record.get("started_at") or None,
            "finished_at": record.get("finished_at") or None}
