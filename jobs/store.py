"""Every job's state in Redis, so that any replica answers for any job and a restarted one loses nothing.

Keys (all under style-jobs:, the queue itself is arq's):
  job:{id}          hash: status, times, progress, error, attempt, owner, what the result should be, webhook
  request:{id}      hash: the body to send to TorchServe and its content type; deleted when the job ends
  result:{id}       hash: the answer's body, content type and headers
  events:{id}       stream: queued, started, progress, done, error, canceled (what GET .../events replays)
  idempotency:{sha} the job an Idempotency-Key made
  cancel:{id}.{n}   set to cancel attempt n: the worker's handler reads it (handler/cancellation.py)
  active            set of the ids not yet ended, which the recovery loop (worker.py) looks after
  replica:{name}    a replica's heartbeat
Status changes are Lua scripts that check the current status, so that a cancel and the end of a run never both
win. When a job ends, everything it left expires after the retention time.
"""

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

PREFIX = "style-jobs:"
CANCEL_KEY_PREFIX = PREFIX + "cancel:"  # the same as handler/cancellation.py's (a test checks)
ACTIVE = PREFIX + "active"
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
ACTIVE_STATUSES = ("queued", "running")
END_EVENTS = {"succeeded": "done", "failed": "error", "canceled": "canceled"}
EVENTS = ("queued", "started", "progress", "done", "error", "canceled")
EVENTS_KEPT = 2000  # progress events of one job kept for replay (about 15 minutes of them)

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
           'attempt', 0, 'job', ARGV[5], 'idempotency', idem)
redis.call('HSET', request, 'body', ARGV[6], 'content_type', ARGV[7])
redis.call('XADD', events, '*', 'event', 'queued', 'data', ARGV[9])
redis.call('SADD', KEYS[5], id)
if idem ~= '' then redis.call('SET', idem, id, 'EX', retention) end
return {'created', id, fingerprint}
"""

_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return -1 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
return attempt
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempt', -1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'owner', '')
return 1
"""

# KEYS: job, request, result, events, active, idem; ARGV: id, status, now, error, result body, result type,
# result headers, retention, event, event data
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], 'body', ARGV[5], 'content_type', ARGV[6], 'headers', ARGV[7])
end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[4], '*', 'event', ARGV[9], 'data', ARGV[10])
redis.call('SREM', KEYS[5], ARGV[1])
local retention = tonumber(ARGV[8])
for _, key in ipairs({KEYS[1], KEYS[3], KEYS[4]}) do redis.call('EXPIRE', key, retention) end
if KEYS[6] ~= '' then redis.call('EXPIRE', KEYS[6], retention) end
return 1
"""


def key(kind: str, job_id: str) -> str:
    return f"{PREFIX}{kind}:{job_id}"


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


class Store:
    def __init__(self, redis: Redis, retention_seconds: int):
        self.redis, self.retention = redis, retention_seconds
        self._create = redis.register_script(_CREATE)
        self._begin = redis.register_script(_BEGIN)
        self._release = redis.register_script(_RELEASE)
        self._finish = redis.register_script(_FINISH)

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

    async def begin_attempt(self, job_id: str, owner: str) -> int:
        """The number of the attempt now starting (1 for the first), or -1 when the job has ended."""
        return int(await self._begin(keys=[key("job", job_id)], args=[owner, now_iso()]))

    async def release_attempt(self, job_id: str) -> None:
        """Give back an attempt interrupted on purpose (this replica stopping): it does not count."""
        await self._release(keys=[key("job", job_id)])

    async def add_event(self, job_id: str, event: str, data: dict) -> None:
        await self.redis.xadd(key("events", job_id), {"event": event, "data": json.dumps(data)},
                              maxlen=EVENTS_KEPT, approximate=True)

    async def record_progress(self, job_id: str, progress: dict) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key("job", job_id), "progress", json.dumps({k: v for k, v in progress.items()
                                                                  if k not in ("event", "preview")}))
            pipe.xadd(key("events", job_id), {"event": "progress", "data": json.dumps(progress)},
                      maxlen=EVENTS_KEPT, approximate=True)
            await pipe.execute()

    async def finish(self, job_id: str, status: str, data: dict, error: dict | None = None,
                     result: tuple[bytes, str, dict] | None = None) -> bool:
        """End an active job with `status`; False when it had already ended (a cancel came first)."""
        record = await self.get(job_id)
        if record is None:
            return False
        body, content_type, headers = result or (b"", "", {})
        ended = await self._finish(
            keys=[key("job", job_id), key("request", job_id), key("result", job_id), key("events", job_id), ACTIVE,
                  record.get("idempotency", "")],
            args=[job_id, status, now_iso(), json.dumps(error) if error else "", body, content_type,
                  json.dumps(headers), self.retention, END_EVENTS[status], json.dumps(data)])
        return bool(ended)

    async def cancel_attempts(self, job_id: str, attempts: range) -> None:
        """Ask the workers running these attempts to stop (handler/cancellation.py)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for attempt in attempts:
                pipe.set(f"{CANCEL_KEY_PREFIX}{job_id}.{attempt}", "1", ex=self.retention)
            await pipe.execute()

    async def events(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, str, dict]]:
        """The events after stream id `after` ("0" for all), waiting up to block_ms for one (None: not at all)."""
        found = await self.redis.xread({key("events", job_id): after}, block=block_ms, count=100)
        return [(entry_id.decode(), fields[b"event"].decode(), json.loads(fields[b"data"]))
                for _, entries in found for entry_id, fields in entries]

    async def active_ids(self) -> list[str]:
        return [member.decode() async for member in self.redis.sscan_iter(ACTIVE, count=500)]

    async def heartbeat(self, replica: str, ttl_seconds: float) -> None:
        await self.redis.set(f"{PREFIX}replica:{replica}", "1", px=int(ttl_seconds * 1000))

    async def replica_alive(self, replica: str) -> bool:
        return bool(replica) and bool(await self.redis.exists(f"{PREFIX}replica:{replica}"))

    async def count_active(self) -> dict[str, int]:
        """Active jobs by status, for the metrics (autoscaling on the queue's depth)."""
        counts = dict.fromkeys(ACTIVE_STATUSES, 0)
        for job_id in await self.active_ids():
            status = await self.redis.hget(key("job", job_id), "status")
            if status is not None and status.decode() in counts:
                counts[status.decode()] += 1
        return counts


def public_status(record: dict) -> dict:
    """GET /jobs/{id}'s body (CONTRACT.md)."""
    return {"id": record["id"], "status": record["status"],
            "progress": json.loads(record["progress"]) if record.get("progress") else None,
            "error": json.loads(record["error"]) if record.get("error") else None,
            "created_at": record.get("created_at"), "started_at": record.get("started_at") or None,
            "finished_at": record.get("finished_at") or None}
