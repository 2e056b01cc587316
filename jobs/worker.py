"""The queue's worker: arq runs `run_job` for each queued job, which sends the job to TorchServe and records what
happens; the supervision that keeps arq polling through store outages; the recovery loop that loses no job.

Runs and leases: each execution of a job is a run with an id of its own, never used again (store.py). A run
begins by taking the job and its lease, renews the lease every third of lease_seconds from a task of its own,
and changes the job only while it still holds it (the store checks, atomically). A run whose job was taken
away (its replica stalled past the lease: a paused node, a hung event loop) records nothing more, closes its
request and sets its cancel key, so that TorchServe stops computing it: a job is computed by at most one live
run.

Attempts: a run that breaks off in TorchServe (its worker died, the stream was cut) counts, and the job is
tried again until max_attempts; then it fails with the reason. A run cut short by the service itself (this
replica stopping, a lapsed lease) does not count; the next run's `started` event says why (`retried_after`).
Only a client's cancel ends a job `canceled`.

Time: a job's deadline is job_timeout_seconds after its first run began, whatever happens to its runs; past
it the job fails with 504 Timeout. arq's own time limit for a run_job call lies outside it
(ARQ_TIMEOUT_MARGIN_SECONDS more), so that ours always comes first.

Segments: a run asks TorchServe for one segment of at most segment_seconds, from the job's last checkpoint
(segments.py). A segment that ends with iterations left answers with its checkpoint: the run stores it under a
name of its own, makes it the job's and lets the job go (both one transition, so that a run that lost its job
changes nothing), deletes the previous one, and queues the job again behind the jobs already waiting (arq's
Retry, deferred past now): other jobs and direct requests get TorchServe's worker between segments. The job
stays `running`, its progress that of one run; a run cut short loses at most its segment, and the next run
starts from the last checkpoint.

Requests and results: a run streams its job's request from the object store to TorchServe, at every try, and
writes the result TorchServe answers back there, under a name of its own, before it ends the job; the
request is deleted once the job has ended.

Busy TorchServe (its queue full, no worker up, not reachable) or object store: the run sends the request again
after a jittered, growing wait, never shorter than TorchServe's Retry-After. The job stays `queued` until
TorchServe takes the request.

Stopping (SIGTERM, QueueWorker.stop): no job is taken any more, and each running one is given back at once for
another replica: its run's cancel key set, not counted.

Store outages: arq's poll loop ends at the first failed Redis call; QueueWorker starts it again with back-off.
Runs go on in TorchServe meanwhile; their lease is renewed, and their end recorded, once the store is back.

Recovery: every replica, every third of lease_seconds, looks over the jobs with one call to the store, whatever
their number (Store.look_over): a run whose lease has lapsed (the store keeps the leases by when they lapse)
gives its job back (its cancel key set) and the job is queued again at once; a job that no run holds is made
sure to be in arq's queue and not marked as taken by a pick-up that began no run, for the jobs at the head of
the queue (where arq takes jobs, so where such a mark can be) at every pass, and for every active job in turn,
LOOK_OVER_BATCH a pass (a job that fell out of the queue, which only a crash between two steps or a store that
lost writes leaves). It judges leases and marks only after it has reached the store for a whole lease period:
after an outage, the runs that still live renew theirs first.

The queue is arq's, under a name of this release's own (QUEUE): the previous release's replicas, which may run
beside this one's during a rolling upgrade, never take its jobs (upgrade.py).
"""

import asyncio
import logging
import random
import signal
import time
import uuid
from typing import AsyncIterator

from arq import Retry, Worker, func
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import WatchError

from .config import JobsConfig
from .objects import OBJECT_STORE_ERRORS, ObjectMissing, ObjectStore
from .store import PREFIX, STORE_ERRORS, Began, Store, StoredResult, TaskQueue, check_eviction_policy
from .segments import CHECKPOINT, NotSpliceable, with_checkpoint
from .torchserve import (Busy, Done, Interrupted, Outcome, Refused, Suspended, TorchServeClient, done_event,
                         result_chunks, result_headers, result_type)

logger = logging.getLogger(__name__)

FUNCTION = "run_job"
QUEUE = PREFIX + "queue"  # arq's sorted set of queued jobs (the previous release used arq's default)
LOOK_OVER_BATCH = 200  # the active jobs (and the lapsed runs) one pass of the recovery looks at, at most
POLL_SECONDS = 0.2  # how often arq looks for queued jobs
ARQ_TIMEOUT_MARGIN_SECONDS = 60  # arq's limit of one run_job call: the job's time limit and this much more
ARQ_MAX_TRIES = 1_000_000  # arq's own count of pick-ups: the attempts that matter are counted here (store.py)
BUSY_WAITS = (0.5, 15.0)  # s: the first and the longest wait for a busy TorchServe
STORE_WAITS = (0.2, 5.0)  # s: the first and the longest wait for a store that cannot be reached

STOPPED = {"code": 503, "type": "ReplicaStopped", "field": None,
           "message": "the jobs service's replica running it was stopped and gave it back"}
LEASE_LAPSED = {"code": 503, "type": "LeaseLapsed", "field": None,
                "message": "the replica running it stopped renewing its lease (it was stopped, stalled or cut off "
                           "from the store)"}
GONE = {"code": 410, "type": "Gone", "message": "the job's request is gone", "field": None}
NEXT_SEGMENT_DEFER_SECONDS = 0.001  # a job's next segment is queued this much after now: behind those waiting
REQUEST = "request"  # the name of a job's request among its objects (objects.JobObjects)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def new_replica_name() -> str:
    return uuid.uuid4().hex[:12]


class Backoff:
    """Growing waits with jitter (each between half and all of the current step, the step doubling up to its
    most), never shorter than what the other side asked for (Retry-After)."""

    def __init__(self, first: float, most: float):
        self.first, self.most = first, most
        self.step = first

    def next(self, at_least: float | None = None) -> float:
        wait = random.uniform(self.step / 2, self.step)
        self.step = min(2 * self.step, self.most)
        return max(wait, at_least or 0.0)

    def reset(self) -> None:
        self.step = self.first


async def until_stored(operation):
    """`await operation()`, tried again after growing waits while the store cannot be reached."""
    waits = Backoff(*STORE_WAITS)
    while True:
        try:
            return await operation()
        except STORE_ERRORS as error:
            logger.warning("jobs: the store cannot be reached (%r): trying again", error)
            await asyncio.sleep(waits.next())


class JobRunner:
    def __init__(self, config: JobsConfig, store: Store, pool: ArqRedis, objects: ObjectStore,
                 torchserve: TorchServeClient, replica: str):
        self.config, self.store, self.pool, self.objects = config, store, pool, objects
        self.torchserve, self.replica = torchserve, replica

    async def run(self, ref: str) -> None:
        """Runs of the job until it ends or another run holds it; on cancellation (this replica stopping) the
        job is given back."""
        while True:
            run = new_run_id()
            began = await self.store.begin(ref, run, self.replica, self.config.lease_seconds,
                                           self.config.job_timeout_seconds)
            if began is None:
                return  # ended (canceled, expired), or another run holds it
            try:
                again = await self._run(ref, run, began)
            except asyncio.CancelledError:
                await self._give_back(ref, run)
                raise
            if again is NEXT_SEGMENT:
                raise Retry(defer=NEXT_SEGMENT_DEFER_SECONDS)  # arq queues it again, after the jobs waiting
            if not again:
                return

    async def _run(self, ref: str, run: str, began: Began) -> bool | object:
        """One run, holding the job's lease; whether the job goes on with another run now, or NEXT_SEGMENT."""
        if began.attempts >= self.config.max_attempts:
            await self._finish(ref, run, "failed", error=_given_up(began.attempts, began.retried_after))
            return False
        working = asyncio.create_task(self._work(ref, run, began))
        lease = asyncio.create_task(self._keep_lease(ref, run))
        try:
            done, _ = await asyncio.wait({working, lease}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lease.cancel()
            working.cancel()  # nothing when it is done; else its request to TorchServe is closed
        if working not in done:
            await self._stop(ref, run)
            logger.warning("jobs: %s run %s no longer holds its job (canceled, or its lease lapsed): it records "
                           "nothing more and TorchServe stops it", ref, run)
            return False
        outcome, stored = working.result()
        if isinstance(outcome, Suspended):
            return await self._end_segment(ref, run, stored)
        if isinstance(outcome, Interrupted):
            logger.warning("jobs: %s run %s broke off: %s", ref, run, outcome.error["message"])
            return await until_stored(lambda: self.store.release(ref, run, outcome.error, counts=True))
        await self._conclude(ref, run, outcome, stored)
        return False

    async def _work(self, ref: str, run: str, began: Began) -> tuple[Outcome, StoredResult | None]:
        """The run's request sent to TorchServe, again while TorchServe is busy, and its result stored, all
        within the job's deadline and while the run holds its lease."""
        record = await until_stored(lambda: self.store.get(ref))
        if record is None or "objects" not in record:  # expired, or queued by a version that kept it in Redis
            return Refused(GONE), None
        started = {"attempt": began.attempts + 1, **({"retried_after": began.retried_after}
                                                      if began.retried_after else {})}
        recorder = _Recorder(self, ref, run, started)
        waits = Backoff(*BUSY_WAITS)
        try:
            async with asyncio.timeout(began.deadline - time.time()):
                while True:
                    outcome = await self._send(ref, run, record, recorder)
                    if isinstance(outcome, Done) and outcome.fields.get("stop_reason") != "canceled":
                        stored = await self._store_result(ref, run, record, outcome, waits)
                        return outcome, stored
                    if isinstance(outcome, Suspended):
                        return outcome, await self._store_checkpoint(ref, run, record, outcome, waits)
                    if not isinstance(outcome, Busy):
                        return outcome, None
                    wait = waits.next(outcome.retry_after)
                    logger.info("jobs: %s waits %.1f s: %s", ref, wait, outcome.reason)
                    await asyncio.sleep(wait)
        except TimeoutError:
            await self._stop(ref, run)
            return Refused({"code": 504, "type": "Timeout", "field": None,
                            "message": f"the job did not finish within {self.config.job_timeout_seconds} s"}), None

    async def _send(self, ref: str, run: str, record: dict, recorder: "_Recorder") -> Outcome:
        """One try: the request streamed from the object store to TorchServe. The object store not answering
        is waited for like a busy TorchServe."""
        body = _StoredBody()
        try:
            checkpoint = await self._checkpoint(record)
            async with self.objects.read(record["objects"] + REQUEST) as stored:
                chunks, size = body.chunks(stored), stored.size
                if checkpoint is not None:
                    chunks, size = with_checkpoint(chunks, size, record["request_type"], checkpoint)
                outcome = await self.torchserve.run(chunks, size, record["request_type"], f"{ref}.{run}",
                                                    recorder.accepted, recorder.progress, self.config.segment_seconds)
        except ObjectMissing:
            return Refused(GONE)
        except NotSpliceable as error:
            return Refused({"code": 500, "type": "InternalError", "message": str(error), "field": None})
        except OBJECT_STORE_ERRORS as error:
            return Busy(f"the object store cannot be read: {error!r}")
        return Busy(f"the object store broke off reading the request: {body.failed!r}") if body.failed else outcome

    async def _checkpoint(self, record: dict) -> bytes | None:
        """The job's last checkpoint, None before its first segment has ended."""
        if not record.get("checkpoint"):
            return None
        async with self.objects.read(record["checkpoint"]) as stored:
            return b"".join([chunk async for chunk in stored])

    async def _store_result(self, ref: str, run: str, record: dict, outcome: Done,
                            waits: Backoff) -> StoredResult:
        """The result written to the object store under a name of the run's own (a run that lost its job
        never overwrites the result of the one that took it)."""
        response = record.get("response", "image")
        result_key = f"{record['objects']}result-{run}"
        size = await self._put(ref, run, result_key, lambda: result_chunks(outcome.fields, response), waits)
        return StoredResult(result_key, size, result_type(outcome.fields, response), result_headers(outcome.fields))

    async def _store_checkpoint(self, ref: str, run: str, record: dict, outcome: Suspended,
                                waits: Backoff) -> StoredResult:
        """A segment's checkpoint written to the object store under a name of the run's own, like a result."""
        key = f"{record['objects']}{CHECKPOINT}-{run}"
        size = await self._put(ref, run, key, lambda: _one_chunk(outcome.checkpoint), waits)
        return StoredResult(key, size, "application/x-style-checkpoint", {})

    async def _put(self, ref: str, run: str, key: str, chunks, waits: Backoff) -> int:
        """`chunks()` written to the object store under `key`, tried again while the store cannot be reached."""
        while True:
            try:
                return await self.objects.put(key, chunks())
            except OBJECT_STORE_ERRORS as error:
                logger.warning("jobs: %s run %s cannot store %s (%r): trying again", ref, run, key, error)
                await asyncio.sleep(waits.next())

    async def _end_segment(self, ref: str, run: str, checkpoint: StoredResult) -> bool | object:
        """The segment's checkpoint made the job's, the previous one deleted; NEXT_SEGMENT, or False when the
        run no longer holds its job (its checkpoint is then deleted: nobody's)."""
        previous = await until_stored(lambda: self.store.end_segment(ref, run, checkpoint.key, checkpoint.size))
        unused = checkpoint.key if previous is None else previous
        if unused:
            try:
                await self.objects.delete(unused)
            except OBJECT_STORE_ERRORS as error:
                logger.warning("jobs: %s: checkpoint %s stays until the job expires (%r)", ref, unused, error)
        return False if previous is None else NEXT_SEGMENT

    async def _keep_lease(self, ref: str, run: str) -> None:
        """Renew the run's lease; returns when the run no longer holds its job."""
        while True:
            await asyncio.sleep(self.config.lease_seconds / 3)
            try:
                if not await self.store.renew(ref, run, self.config.lease_seconds):
                    return
            except STORE_ERRORS as error:  # the run goes on; its lease is renewed once the store is back
                logger.warning("jobs: %s run %s cannot renew its lease (%r)", ref, run, error)

    async def _conclude(self, ref: str, run: str, outcome: Outcome, stored: StoredResult | None) -> None:
        if isinstance(outcome, Done) and stored is None:
            # TorchServe stopped it on its cancel key: whoever took the job from this run (a client's cancel,
            # the recovery of its lease) set it, and has recorded what happens to the job
            return
        if isinstance(outcome, Done):
            await self._finish(ref, run, "succeeded", data=done_event(outcome.fields, ref.split(":", 1)[1]),
                               result=stored)
        else:
            await self._finish(ref, run, "failed", error=outcome.error)

    async def _finish(self, ref: str, run: str, status: str, data: dict | None = None,
                      error: dict | None = None, result: StoredResult | None = None) -> None:
        data = error if status == "failed" else (data or {"id": ref.split(":", 1)[1]})
        if await until_stored(lambda: self.store.finish(ref, status, data, error=error, result=result, run=run)):
            await delete_request(self.store, self.objects, ref)
        else:
            logger.info("jobs: %s run %s ended (%s) but no longer holds its job: nothing recorded", ref, run, status)

    async def _give_back(self, ref: str, run: str) -> None:
        """This replica is stopping: the job is queued again at once, for any replica, without using an
        attempt. A store that cannot be reached now leaves it to the recovery of the lapsed lease."""
        try:
            if await self.store.release(ref, run, STOPPED, counts=False):
                await enqueue(self.pool, ref)  # in case the queue forgot it (a run that lost its lease ended)
                logger.info("jobs: %s given back (run %s)", ref, run)
        except STORE_ERRORS as error:
            logger.warning("jobs: %s could not be given back (%r): another replica takes it when its lease "
                           "lapses", ref, error)

    async def _stop(self, ref: str, run: str) -> None:
        try:
            await self.store.stop_run(ref, run)
        except STORE_ERRORS as error:  # whoever took the job set it too
            logger.warning("jobs: %s run %s: cannot set its cancel key (%r)", ref, run, error)


async def delete_request(store: Store, objects: ObjectStore, ref: str) -> None:
    """An ended job's request and checkpoint are no longer needed (nor counted in its client's storage); what
    cannot be deleted now goes with the job's other objects when it expires."""
    try:
        record = await store.get(ref)
        if record is not None:
            await objects.delete(record["objects"] + REQUEST)
            if record.get("checkpoint"):
                await objects.delete(record["checkpoint"])
    except (*STORE_ERRORS, *OBJECT_STORE_ERRORS) as error:
        logger.warning("jobs: %s: its request stays until the job expires (%r)", ref, error)


class _StoredBody:
    """A request's bytes as they are read from the object store, remembering why reading failed, if it did
    (what the HTTP client then reports is a broken connection, which is not TorchServe's doing)."""

    def __init__(self):
        self.failed: BaseException | None = None

    async def chunks(self, stored) -> AsyncIterator[bytes]:
        try:
            async for chunk in stored:
                yield chunk
        except OBJECT_STORE_ERRORS as error:
            self.failed = error
            raise


class _Recorder:
    """What a run tells the store while TorchServe answers: that TorchServe took the request (the job is
    `running`, with its `started` event) and its progress. A store that is away loses progress, never the run."""

    def __init__(self, runner: JobRunner, ref: str, run: str, started: dict):
        self.runner, self.ref, self.run, self.started = runner, ref, run, started
        self.recorded = False

    async def accepted(self) -> None:
        try:
            self.recorded = await self.runner.store.accept(self.ref, self.run, self.started)
        except STORE_ERRORS as error:
            logger.warning("jobs: %s: cannot record its start (%r)", self.ref, error)

    async def progress(self, progress: dict) -> None:
        if not self.recorded:
            await self.accepted()
        try:
            await self.runner.store.record_progress(self.ref, self.run, progress)
        except STORE_ERRORS:
            pass


NEXT_SEGMENT = object()  # what a run whose segment ended returns: the job is queued again, behind those waiting


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _given_up(attempts: int, last_error: dict | None) -> dict:
    reason = last_error["message"] if last_error else "the jobs service running it stopped"
    return {"code": 502, "type": last_error["type"] if last_error else "Interrupted", "field": None,
            "message": f"the job was interrupted {attempts} time(s) and is not tried again; last: {reason}"}


async def run_job(ctx: dict, ref: str) -> None:
    await ctx["runner"].run(ref)


async def enqueue(pool: ArqRedis, ref: str) -> None:
    """Queue the job under its ref: arq does nothing when a job of that id is queued or running."""
    await pool.enqueue_job(FUNCTION, ref, _job_id=ref, _queue_name=QUEUE)


class QueueWorker:
    """arq's worker in this process's event loop (its signals are this process's, __main__.py), polling again
    after every store outage."""

    def __init__(self, config: JobsConfig, pool: ArqRedis, runner: JobRunner):
        self.worker = Worker(functions=[func(run_job, name=FUNCTION, keep_result=0, max_tries=ARQ_MAX_TRIES,
                                             timeout=config.job_timeout_seconds + ARQ_TIMEOUT_MARGIN_SECONDS)],
                             redis_pool=pool, queue_name=QUEUE, max_jobs=config.concurrency, handle_signals=False,
                             ctx={"runner": runner}, poll_delay=POLL_SECONDS, keep_result=0)

    @property
    def task_queue(self) -> TaskQueue:
        """Where arq keeps the jobs, and how it takes them: from the first queue_read_limit of its queue, marking
        each as in progress for in_progress_timeout_s."""
        return TaskQueue(QUEUE, job_key_prefix, in_progress_key_prefix, int(self.worker.in_progress_timeout_s * 1000),
                         self.worker.queue_read_limit)

    async def run(self) -> None:
        """Poll arq's queue until cancelled; raises StoreRefused for a Redis that may evict keys (checked
        whenever the store is reached again: it may have restarted with another configuration)."""
        waits = Backoff(*STORE_WAITS)
        while True:
            try:
                await check_eviction_policy(self.worker.pool)
                waits.reset()
                await self.worker.async_run()
            except (*STORE_ERRORS, WatchError) as error:  # redis-py reports a connection lost under WATCH so
                logger.warning("jobs: the queue's store cannot be reached (%r): polling again shortly", error)
                await self._count_slots_again()
                await asyncio.sleep(waits.next())

    async def _count_slots_again(self) -> None:
        """arq 0.28 takes a slot (its semaphore and job counter) before the Redis calls that start a job and
        does not give it back when one of them fails: count them again from the runs still going."""
        going = sum(not task.done() for task in self.worker.tasks.values())
        self.worker.job_counter = going
        self.worker.sem = asyncio.BoundedSemaphore(self.worker.max_jobs + 1)
        for _ in range(going):
            await self.worker.sem.acquire()

    async def stop(self) -> None:
        """Take no more jobs and give the running ones back (each run's cancellation, JobRunner.run)."""
        self.worker.allow_pick_jobs = False
        self.worker.handle_sig(signal.SIGTERM)  # cancels the poll loop and every running job
        await asyncio.gather(*self.worker.tasks.values(), return_exceptions=True)


class Recovery:
    """The look-over of the jobs (see the module's doc)."""

    def __init__(self, config: JobsConfig, store: Store, pool: ArqRedis, queue: TaskQueue):
        self.config, self.store, self.pool, self.queue = config, store, pool, queue
        self.cursor = 0  # where the next pass's slice of the active jobs begins

    async def run_forever(self) -> None:
        reached_since = None  # monotonic time of the first pass that reached the store after it could not
        while True:
            started = time.monotonic()
            try:
                await self.look_over(reached_since is not None and
                                     started - reached_since >= self.config.lease_seconds)
                reached_since = reached_since or started
            except STORE_ERRORS as error:
                if reached_since is not None:
                    logger.warning("jobs: recovery cannot reach the store (%r)", error)
                reached_since = None
            await asyncio.sleep(self.config.lease_seconds / 3)

    async def look_over(self, judge: bool) -> None:
        """One pass; `judge`: whether lapsed leases and pick-ups may be taken for dead. One call to the store,
        and a few for each job it mends."""
        found = await self.store.look_over(judge, self.cursor, LOOK_OVER_BATCH, self.queue, self.config.lease_seconds)
        self.cursor = found.cursor
        for ref, run, owner in found.lapsed:
            if await self.store.release(ref, run, LEASE_LAPSED, counts=False, only_if_lapsed=True):
                logger.warning("jobs: %s run %s of replica %s let its lease lapse: queued again", ref, run, owner)
                await self.pool.delete(self.queue.picked_prefix + ref)  # the mark of the pick-up that ran it
                await enqueue(self.pool, ref)
        for ref in found.unqueued:
            logger.warning("jobs: %s was in no queue: queued again", ref)
            await enqueue(self.pool, ref)
        for ref in found.cleared:
            logger.info("jobs: %s: the queue's mark of its last pick-up, whose run is gone, removed", ref)
        if found.gone:
            logger.warning("jobs: %d active jobs whose records were gone taken off the active jobs", found.gone)
