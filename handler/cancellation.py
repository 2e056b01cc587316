"""Cancellation of the jobs service's requests (jobs/, docs/jobs.md), checked at every iteration.

The jobs service sends each run of a job with the header X-Style-Job-Id (the job's id and the run's, never used
again) and, to stop it, sets the Redis key CANCEL_KEY_PREFIX + that value. The worker reads those keys through
the Redis URL of the environment variable STYLE_JOBS_REDIS_URL, the one place it is configured (the jobs service
reads the same variable). Without it, or for requests without the header (every direct call of the predictions API),
nothing is checked and nothing is slower.

An iteration asks `should_stop(item)`; the keys of the whole batch are read with one MGET at most every
POLL_INTERVAL seconds, so a cancel takes effect within one iteration or POLL_INTERVAL, whichever is longer.
A Redis that fails is logged and then left alone for RETRY_AFTER_ERROR seconds: cancellation is then late,
the optimisation never.
"""

import logging
import os
import re
import time
from typing import Callable

logger = logging.getLogger(__name__)

JOB_HEADER = "x-style-job-id"
CANCEL_KEY_PREFIX = "style-jobs:cancel:"  # jobs/store.py sets these keys
REDIS_URL_ENV = "STYLE_JOBS_REDIS_URL"
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # what jobs/ sends; anything else is not looked up
POLL_INTERVAL = 0.2  # s
RETRY_AFTER_ERROR = 5.0  # s
REDIS_TIMEOUT = 0.2  # s: a slow Redis may delay an iteration by this much at most, once per RETRY_AFTER_ERROR


class CancelSignals:
    """The worker's connection to the jobs service's store, or none when no Redis URL is configured."""

    def __init__(self, redis_url: str | None):
        self.client = None
        if redis_url:
            import redis  # only where jobs are used: the predictions API needs no Redis

            self.client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT,
                                               socket_connect_timeout=REDIS_TIMEOUT)

    @classmethod
    def from_environment(cls) -> "CancelSignals":
        return cls(os.environ.get(REDIS_URL_ENV))

    def watch(self, job_keys: list[str | None]) -> Callable[[int], bool] | None:
        """The engine's should_stop for a batch whose item i is the job run job_keys[i] (None: no job)."""
        if self.client is None or not any(job_keys):
            return None
        return _Watch(self.client, job_keys)


def job_key(headers: dict) -> str | None:
    """The job run a request belongs to, from its headers (any case), if it is one of the jobs service's."""
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == JOB_HEADER and isinstance(value, str):
            return value if JOB_ID_PATTERN.fullmatch(value) else None
    return None


class _Watch:
    def __init__(self, client, job_keys: list[str | None]):
        self.client, self.job_keys = client, job_keys
        self.canceled = [False] * len(job_keys)
        self.next_poll = 0.0

    def __call__(self, item: int) -> bool:
        now = time.monotonic()
        if now >= self.next_poll:
            self.next_poll = now + POLL_INTERVAL
            self._poll()
        return self.canceled[item]

    def _poll(self) -> None:
        watched = [item for item, key in enumerate(self.job_keys) if key and not self.canceled[item]]
        if not watched:
            return
        try:
            values = self.client.mget([CANCEL_KEY_PREFIX + self.job_keys[item] for item in watched])
        except Exception as error:  # any failure of the store: the optimisation goes on
            logger.warning("style_transfer: cannot read cancellations from Redis (%s); next try in %.0f s",
                           error, RETRY_AFTER_ERROR)
            self.next_poll = time.monotonic() + RETRY_AFTER_ERROR
            return
        for item, value in zip(watched, values):
            if value is not None:
                self.canceled[item] = True
                logger.info("style_transfer: job %s canceled", self.job_keys[item])
