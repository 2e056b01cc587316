"""The queue's worker: arq runs `run_job` for each queued job; it sends the job to TorchServe and records what
happens. Also the replica's heartbeat and the recovery loop that makes sure no job is lost.

Attempts: a run that breaks off (the TorchServe worker died, the connection was cut, this service was killed)
is tried again until max_attempts; then the job fails with the reason. A cancel ends the job at once (api.py)
and sets the cancel key of each attempt, which the TorchServe worker reads at its next iteration.

Recovery: arq keeps a job in its queue until the function returns, and marks a job being run with an
in-progress key that lives for the job timeout (an hour). A replica that is killed leaves that key behind.
Each replica therefore beats a heartbeat into the store, and every few seconds looks at the active jobs:
a running job whose replica has stopped beating has its in-progress key removed so that arq starts it again at
once, on any replica; a job that is in no queue at all (its submit was cut short) is queued again.
"""

import asyncio
import json
import logging
import time
import uuid

from arq import Worker, func
from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix

from .config import JobsConfig
from .store import ACTIVE, Store, public_status
from .torchserve import Busy, Done, Interrupted, Refused, TorchServeClient, done_event, result_of
from .webhooks import WebhookSender

logger = logging.getLogger(__name__)

FUNCTION = "run_job"
BUSY_RETRY_SECONDS = 1.0  # between tries while TorchServe's queue is full or it is not reachable


class JobRunner:
    def __init__(self, config: JobsConfig, store: Store, torchserve: TorchServeClient, webhooks: WebhookSender,
                 replica: str):
        self.config, self.store, self.torchserve, self.webhooks = config, store, torchserve, webhooks
        self.replica = replica

    async def run(self, job_id: str) -> None:
        deadline = time.monotonic() + self.config.job_timeout_seconds
        last_error = None  # of this replica's attempts: a killed replica's own are not known
        while True:
            attempt = await self.store.begin_attempt(job_id, self.replica)
            if attempt < 0:
                return  # canceled (or expired) before it could start
            if attempt > 1:  # the run before was cut short: make sure it no longer runs anywhere
                await self.store.cancel_attempts(job_id, range(1, attempt))
            if attempt > self.config.max_attempts:
                await self._finish(job_id, "failed", error=_given_up(attempt - 1, last_error))
                return
            # a retry says what interrupted the attempt before, when this replica saw it
            await self._event(job_id, "started", {"attempt": attempt, **({"retried_after": last_error}
                                                                         if last_error else {})})
            try:
                outcome = await self._attempt(job_id, attempt, deadline)
            except asyncio.CancelledError:  # this replica is stopping: the job goes back to the queue
                await asyncio.shield(self._give_back(job_id, attempt))
                raise
            if isinstance(outcome, Interrupted):
                last_error = outcome.error
                logger.warning("jobs: %s attempt %d interrupted: %s", job_id, attempt, outcome.error["message"])
                continue
            await self._conclude(job_id, outcome)
            return

    async def _attempt(self, job_id: str, attempt: int, deadline: float):
        while True:
            request = await self.store.request(job_id)
            if request is None:
                return Refused({"code": 410, "type": "Gone", "message": "the job's request is gone", "field": None})
            left = deadline - time.monotonic()
            if left <= 0:
                return Refused({"code": 504, "type": "Timeout", "field": None,
                                "message": f"the job did not finish within {self.config.job_timeout_seconds} s"})
            outcome = await self.torchserve.run(*request, f"{job_id}.{attempt}", left,
                                                lambda progress: self._progress(job_id, progress))
            if not isinstance(outcome, Busy):
                return outcome
            logger.info("jobs: %s waits: %s", job_id, outcome.reason)
            await asyncio.sleep(BUSY_RETRY_SECONDS)

    async def _progress(self, job_id: str, progress: dict) -> None:
        await self.store.record_progress(job_id, progress)
        await self._notify(job_id, "progress", progress)

    async def _conclude(self, job_id: str, outcome) -> None:
        record = await self.store.get(job_id)
        if record is None or record["status"] not in ("queued", "running"):
            return  # canceled while it ran: the cancel has ended it
        if isinstance(outcome, Done) and outcome.fields.get("stop_reason") == "canceled":
            await self._finish(job_id, "canceled")
        elif isinstance(outcome, Done):
            response = json.loads(record["job"]).get("response", "image")
            await self._finish(job_id, "succeeded", data=done_event(outcome.fields, job_id),
                               result=result_of(outcome.fields, response))
        else:
            await self._finish(job_id, "failed", error=outcome.error)

    async def _finish(self, job_id: str, status: str, data: dict | None = None, error: dict | None = None,
                      result=None) -> None:
        data = error if status == "failed" else (data or {"id": job_id})
        if await self.store.finish(job_id, status, data, error=error, result=result):
            await self._notify(job_id, {"succeeded": "done", "failed": "error", "canceled": "canceled"}[status], data)

    async def _give_back(self, job_id: str, attempt: int) -> None:
        await self.store.cancel_attempts(job_id, range(attempt, attempt + 1))
        await self.store.release_attempt(job_id)

    async def _event(self, job_id: str, event: str, data: dict) -> None:
        await self.store.add_event(job_id, event, data)
        await self._notify(job_id, event, data)

    async def _notify(self, job_id: str, event: str, data: dict) -> None:
        record = await self.store.get(job_id)
        if record is not None:
            self.webhooks.notify(record, event, {**public_status(record), "event_data": data})


def _given_up(attempts: int, last_error: dict | None) -> dict:
    reason = last_error["message"] if last_error else "the jobs service running it stopped"
    return {"code": 502, "type": last_error["type"] if last_error else "Interrupted", "field": None,
            "message": f"the job was interrupted {attempts} time(s) and is not tried again; last: {reason}"}


async def run_job(ctx: dict, job_id: str) -> None:
    await ctx["runner"].run(job_id)


def make_worker(config: JobsConfig, pool: ArqRedis, runner: JobRunner) -> Worker:
    """arq's worker in this process's event loop; its signals are this process's (see __main__.py)."""
    return Worker(functions=[func(run_job, name=FUNCTION, timeout=config.job_timeout_seconds, keep_result=0,
                                  max_tries=config.max_attempts + 10)],
                  redis_pool=pool, max_jobs=config.concurrency, handle_signals=False, ctx={"runner": runner},
                  poll_delay=0.2, job_timeout=config.job_timeout_seconds, keep_result=0)


async def enqueue(pool: ArqRedis, job_id: str) -> None:
    """Queue the job under its own id: arq does nothing when a job of that id is queued or running."""
    await pool.enqueue_job(FUNCTION, job_id, _job_id=job_id)


class Recovery:
    """The heartbeat of this replica and the look-over of the active jobs (see the module's doc)."""

    def __init__(self, config: JobsConfig, store: Store, pool: ArqRedis, replica: str):
        self.config, self.store, self.pool, self.replica = config, store, pool, replica

    async def run_forever(self) -> None:
        while True:
            try:
                await self.store.heartbeat(self.replica, 4 * self.config.heartbeat_seconds)
                await self.look_over()
            except Exception:  # the store may be restarting: try again at the next beat
                logger.exception("jobs: recovery pass failed")
            await asyncio.sleep(self.config.heartbeat_seconds)

    async def look_over(self) -> None:
        for job_id in await self.store.active_ids():
            record = await self.store.get(job_id)
            if record is None:
                await self.store.redis.srem(ACTIVE, job_id)
                continue
            if not await self.pool.exists(job_key_prefix + job_id):
                logger.warning("jobs: %s was in no queue: queued again", job_id)
                await enqueue(self.pool, job_id)
            elif record["status"] == "running" and not await self.store.replica_alive(record.get("owner", "")):
                if await self.pool.delete(in_progress_key_prefix + job_id):
                    logger.warning("jobs: %s was left running by a stopped replica: started again", job_id)


def new_replica_name() -> str:
    return uuid.uuid4().hex[:12]


async def queue_depth(pool: ArqRedis) -> int:
    """Jobs in arq's queue, waiting or running: the demand on TorchServe."""
    return await pool.zcard(default_queue_name)
