"""The previous release's jobs, moved to this release's layout: an upgrade loses none, even a rolling one.

The previous release (that of 2026-12-03, and this project's main until images moved to the object store) had
one client and kept each job under its bare id: `style-jobs:job:{id}` (its `job` field the response and webhook
settings; `run` the run holding it, or, in 2026-12-03's, `attempt`, the n of a running job's run `{id}.{n}`),
its request's body in `request:{id}`, its result's in `result:{id}`, its events in `events:{id}`, its
Idempotency-Key's hash in `idempotency:{sha}`, its lease in `lease:{id}`, the unfinished ids in the set
`active`, and arq's queue under arq's default name with entries named by the bare ids.

This release keeps apart from those keys: its own set of unfinished jobs and its own arq queue (store.ACTIVE,
worker.QUEUE). So replicas of both releases can run side by side during a rolling upgrade without either
taking the other's jobs: one of the previous release never runs a job of this one (it would fail it, finding no
request in Redis), and never sees one in its look-overs.

Every replica moves the previous release's jobs to this layout, to the client `default` (the only client that
release had):
  - once, every job the previous release left (a SCAN of the records under bare ids), when it starts;
  - then, every few seconds, the jobs in the previous release's `active` set: those its replicas still take
    in, or give back, while the rollout goes on;
  - and at once, when client `default` asks for a job, or sends an id or Idempotency-Key, that only the
    previous layout knows (a job a replica of the previous release made or ended after this one looked).
One replica at a time passes over them (a lock in the store that lapses when its holder dies, so another
finishes); a job asked for moves whichever replica is asked.

One job moves in one atomic step (_MOVE), after its request (unfinished) or result (succeeded) has been copied
to the object store: its record, events and Idempotency-Key renamed, expiring when they did (an ended job's
retention runs on); its quotas and the counters counted; its request and result taken out of Redis; its entry
taken off the previous queue, and an unfinished job queued on this release's. The step checks that the job is
as it was when its bytes were read (else it reads them again), so that two replicas moving one job at once, or a
replica that dies between the copy and the step and a restart, move it once: what a copy that no step took
left is deleted (retention.py deletes it after a crash). A job that a run of the previous release holds is
taken from that run as this release's recovery takes a lapsed lease: in the same step the run's cancel key
(the previous release's name for it) is set, so that TorchServe stops it, and the job is queued again without
using up an attempt; its next run's `started` event says `retried_after`: `Upgraded`. Nobody's job ends
`canceled` for it, and no job is computed by two live runs.

Fingerprints: the previous release hashed a multipart body in another form than this one does; a moved job
keeps that release's fingerprint (store.PREVIOUS_FINGERPRINT), which a submit compares in that form
(submission.previous_release_fingerprint), so that an Idempotency-Key or an id sent again still replays it.
"""

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator

from arq.connections import ArqRedis
from arq.constants import default_queue_name, job_key_prefix, retry_key_prefix

from .auth import DEFAULT_CLIENT
from .objects import OBJECT_STORE_ERRORS, JobObjects, ObjectStore
from .store import (ACTIVE, ACTIVE_STATUSES, LUA_LIB, PREFIX, PREVIOUS_FINGERPRINT, STORE_ERRORS, UPLOADS, Store,
                    client_key, job_ref, key)
from .worker import REQUEST, enqueue

logger = logging.getLogger(__name__)

PREVIOUS_ACTIVE = PREFIX + "active"
PREVIOUS_QUEUE = default_queue_name
LOCK = PREFIX + "upgrade-lock"
LOCK_MS = 3000  # a pass renews it every third of this; one whose holder died lapses for another replica
CHANGED_TRIES = 5  # reads of a job that changed while it was being moved, before a later pass tries again
SCAN_COUNT = 1000
RESULT = "result"  # the name of a moved job's result among its objects (a run's are result-<run>)
UPGRADED = {"code": 503, "type": "Upgraded", "field": None,
            "message": "the jobs service was upgraded while a replica of its previous release ran the job"}

# KEYS: the job's record (this layout), its previous record, previous events, events, the previous request,
# result and lease, the active jobs, the previous active set and queue, arq's previous entry and its retry count,
# the client's usage, the uploads. ARGV: id, ref, client, the status and created_at it was read with, its
# objects' prefix, request bytes, request content type, result key, result bytes, result content type, result
# headers, fingerprint, retention (s), the Upgraded error, now (epoch s), response, webhook settings.
_MOVE = LUA_LIB + """
local new, old = KEYS[1], KEYS[2]
local id, ref, client = ARGV[1], ARGV[2], ARGV[3]
local status = redis.call('HGET', old, 'status')
if not status then return {'none', '', ''} end
if status ~= ARGV[4] or redis.call('HGET', old, 'created_at') ~= ARGV[5] then return {'changed', '', ''} end
local unfinished = status == 'queued' or status == 'running'
local run = redis.call('HGET', old, 'run')
if not run and status == 'running' then run = redis.call('HGET', old, 'attempt') end  -- 2026-12-03's
run = run or ''
if unfinished and run ~= '' then
  redis.call('SET', P .. 'cancel:' .. id .. '.' .. run, '1', 'EX', tonumber(ARGV[14]))
end
local attempts = redis.call('HGET', old, 'attempts')
if not attempts then  -- 2026-12-03's `attempt` counted the running one too
  attempts = tonumber(redis.call('HGET', old, 'attempt') or '0')
  if status == 'running' then attempts = math.max(attempts - 1, 0) end
end
local old_idem = redis.call('HGET', old, 'idempotency') or ''
redis.call('SREM', KEYS[9], id)
redis.call('ZREM', KEYS[10], id)
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7], KEYS[11], KEYS[12])
if redis.call('EXISTS', new) == 1 then
  -- its id sent again through a replica of the previous release after the job moved: the same job
  if old_idem ~= '' and redis.call('GET', old_idem) == id then redis.call('DEL', old_idem) end
  redis.call('DEL', old, KEYS[3])
  return {'duplicate', status, run}
end
local ttl = redis.call('PTTL', old)
if ttl < 0 then ttl = tonumber(ARGV[14]) * 1000 end
redis.call('RENAME', old, new)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[4]) end
local idem = ''
if old_idem ~= '' then
  idem = P .. 'idempotency:' .. client .. ':' .. string.sub(old_idem, string.len(P .. 'idempotency:') + 1)
  if redis.call('EXISTS', idem) == 0 then
    -- the previous release kept it for the retention from the submit: it may have expired before its job
    if redis.call('GET', old_idem) == id then redis.call('RENAME', old_idem, idem) else redis.call('SET', idem, id) end
  end
  if redis.call('GET', idem) ~= id then
    idem = ''  -- the key made another job since
  elseif unfinished then
    redis.call('PERSIST', idem)
  else
    redis.call('PEXPIRE', idem, ttl)
  end
  if redis.call('GET', old_idem) == id then redis.call('DEL', old_idem) end
end
redis.call('HDEL', new, 'job', 'attempt')
redis.call('HSET', new, 'client', client, 'attempts', attempts, 'run', '', 'owner', '', 'response', ARGV[17],
           'webhook', ARGV[18], 'idempotency', idem, 'fingerprint', ARGV[13])
if unfinished then
  local size = tonumber(ARGV[7])
  redis.call('HSET', new, 'status', 'queued', 'objects', ARGV[6], 'request_bytes', size, 'request_type', ARGV[8])
  if run ~= '' then redis.call('HSET', new, 'retried_after', ARGV[15]) end
  count('queued', 1)
  count('stored_bytes', size)
  redis.call('HINCRBY', KEYS[13], 'unfinished', 1)
  redis.call('HINCRBY', KEYS[13], 'stored_bytes', size)
  enlist(KEYS[8], ref)
  redis.call('ZREM', KEYS[14], ARGV[6])
elseif ARGV[9] ~= '' then
  local size = tonumber(ARGV[10])
  redis.call('HSET', new, 'objects', ARGV[6], 'result_key', ARGV[9], 'result_bytes', size, 'result_type', ARGV[11],
             'result_headers', ARGV[12])
  count('stored_bytes', size)
  redis.call('HINCRBY', KEYS[13], 'stored_bytes', size)
  redis.call('ZADD', P .. 'expiring', tonumber(ARGV[16]) + ttl / 1000,
             cjson.encode({client = client, objects = ARGV[6], bytes = size}))
  redis.call('ZREM', KEYS[14], ARGV[6])
end
return {'moved', status, run}
"""

_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


@dataclass(frozen=True)
class _Copied:
    """What of a job was copied to the object store: its request (unfinished), or its result (succeeded)."""
    request_bytes: int = 0
    request_type: str = ""
    result_key: str = ""
    result_bytes: int = 0
    result_type: str = ""
    result_headers: str = "{}"


class Upgrade:
    """Moves the previous release's jobs (see the module's doc)."""

    def __init__(self, store: Store, pool: ArqRedis, objects: ObjectStore, replica: str):
        self.store, self.pool, self.objects, self.replica = store, pool, objects, replica
        self._move, self._renew_lock = (pool.register_script(script) for script in (_MOVE, _RENEW_LOCK))
        self._one_at_a_time = asyncio.Lock()  # one job's request or result in memory at a time

    async def run_forever(self, period: float) -> None:
        """The pass over every job the previous release left, once, then over its unfinished ones every
        `period` s while there are any."""
        scanned = False
        while True:
            try:
                if not scanned or await self.pool.scard(PREVIOUS_ACTIVE):
                    scanned = await self.move_all(scan=not scanned) or scanned
            except (*STORE_ERRORS, *OBJECT_STORE_ERRORS) as error:
                logger.warning("jobs: upgrade: the previous release's jobs are moved later (%r)", error)
            await asyncio.sleep(period)

    async def move_all(self, scan: bool) -> bool:
        """Every job the previous release left (`scan`), or its unfinished ones, under the lock; False when
        another replica holds it, or took it over."""
        if not await self.pool.set(LOCK, self.replica, nx=True, px=LOCK_MS):
            return False
        holding = asyncio.create_task(self._keep_lock())
        outcomes = Counter()
        try:
            async for job_id in self._every_job() if scan else self._unfinished():
                if holding.done():
                    return False
                outcomes[outcome := await self.move(job_id)] += 1
                if outcome == "none" and not scan:  # an id whose record the previous release lost
                    await self.pool.srem(PREVIOUS_ACTIVE, job_id)
        finally:
            holding.cancel()
            await self._renew_lock(keys=[LOCK], args=[self.replica, 0])
        if outcomes["moved"] or outcomes["duplicate"]:
            logger.info("jobs: upgrade: %d jobs of the previous release moved to client %s, %d found moved already",
                        outcomes["moved"], DEFAULT_CLIENT, outcomes["duplicate"])
        return True

    async def _keep_lock(self) -> None:
        """Renew the lock; returns when it was lost (the store was away for longer than it lasts)."""
        try:
            while await self._renew_lock(keys=[LOCK], args=[self.replica, LOCK_MS]):
                await asyncio.sleep(LOCK_MS / 3 / 1000)
        except STORE_ERRORS as error:
            logger.warning("jobs: upgrade: cannot renew the lock (%r)", error)

    async def move_previous(self, client: str, job_id: str | None, idempotency: str | None = None) -> bool:
        """The job of client `default` that only the previous layout knows by `job_id`, or by `idempotency` (the
        hash of an Idempotency-Key), moved now; whether one was."""
        if client != DEFAULT_CLIENT:
            return False
        ids = [job_id] if job_id else []
        if idempotency and (found := await self.pool.get(f"{PREFIX}idempotency:{idempotency}")):
            ids.append(found.decode())
        return "moved" in [await self.move(one) for one in ids]

    async def move(self, job_id: str) -> str:
        """One job of the previous release moved: "moved"; "duplicate" (its id had moved already: the moved job
        answers for it); "none" (no such job); "expiring" (a result that expired before its record: left to
        expire); "changed" (it changed at every read: a later pass moves it)."""
        async with self._one_at_a_time:
            for _ in range(CHANGED_TRIES):
                outcome = await self._try(job_id)
                if outcome != "changed":
                    return outcome
        return outcome

    async def _try(self, job_id: str) -> str:
        record = await self.store.get(job_id)  # the previous layout: a record under the bare id
        if record is None:
            return "none"
        objects = JobObjects.new(DEFAULT_CLIENT, job_id)
        copied = await self._copy(job_id, record["status"], objects)
        if copied is None:
            return "expiring"
        settings = json.loads(record.get("job") or "{}")
        webhook = settings.get("webhook")
        ref = job_ref(DEFAULT_CLIENT, job_id)
        outcome, status, run = (field.decode() for field in await self._move(
            keys=[key("job", ref), key("job", job_id), key("events", job_id), key("events", ref),
                  key("request", job_id), key("result", job_id), key("lease", job_id), ACTIVE, PREVIOUS_ACTIVE,
                  PREVIOUS_QUEUE, job_key_prefix + job_id, retry_key_prefix + job_id, client_key(DEFAULT_CLIENT),
                  UPLOADS],
            args=[job_id, ref, DEFAULT_CLIENT, record["status"], record.get("created_at", ""), objects.prefix,
                  copied.request_bytes, copied.request_type, copied.result_key, copied.result_bytes,
                  copied.result_type, copied.result_headers, PREVIOUS_FINGERPRINT + record.get("fingerprint", ""),
                  self.store.retention, json.dumps(UPGRADED), time.time(), settings.get("response", "image"),
                  json.dumps({"url": webhook, "events": settings.get("webhook_events", [])}) if webhook else ""]))
        if outcome != "moved":
            await self.objects.delete_prefix(objects.prefix)
            await self.store.end_upload(objects.prefix)
        if outcome == "duplicate":
            logger.warning("jobs: upgrade: %s was submitted again through a replica of the previous release after "
                           "it moved: the moved job answers for it", job_id)
        elif outcome == "moved":
            await self._moved(job_id, ref, status, run)
        return outcome

    async def _copy(self, job_id: str, status: str, objects: JobObjects) -> "_Copied | None":
        """An unfinished job's request, or a succeeded job's result, copied from Redis to the object store; None
        for a result that expired before its record."""
        if status in ACTIVE_STATUSES:
            body, content_type = await self.pool.hmget(key("request", job_id), "body", "content_type")
            if body is None:  # its request is gone, as the job's run will say (410)
                return _Copied()
            await self.store.begin_upload(objects.prefix)
            size = await self.objects.put(objects.key(REQUEST), _once(body))
            return _Copied(request_bytes=size, request_type=content_type.decode())
        if status != "succeeded":
            return _Copied()
        body, content_type, headers = await self.pool.hmget(key("result", job_id), "body", "content_type", "headers")
        if body is None:
            return None
        await self.store.begin_upload(objects.prefix)
        size = await self.objects.put(objects.key(RESULT), _once(body))
        return _Copied(result_key=objects.key(RESULT), result_bytes=size, result_type=content_type.decode(),
                       result_headers=headers.decode())

    async def _moved(self, job_id: str, ref: str, status: str, run: str) -> None:
        if status not in ACTIVE_STATUSES:
            logger.info("jobs: upgrade: %s (%s) moved to client %s", job_id, status, DEFAULT_CLIENT)
            return
        await enqueue(self.pool, ref)
        logger.info("jobs: upgrade: %s (%s) moved to client %s and queued%s", job_id, status, DEFAULT_CLIENT,
                    f"; its run {job_id}.{run} of the previous release is stopped in TorchServe" if run else "")

    async def _every_job(self) -> AsyncIterator[str]:
        prefix = key("job", "")
        async for name in self.pool.scan_iter(match=prefix + "*", count=SCAN_COUNT):
            job_id = name.decode()[len(prefix):]
            if ":" not in job_id:  # this layout's are <client>:<id>
                yield job_id

    async def _unfinished(self) -> AsyncIterator[str]:
        async for member in self.pool.sscan_iter(PREVIOUS_ACTIVE, count=SCAN_COUNT):
            yield member.decode()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
