"""What expires: the objects of ended jobs, deleted when their records expire, and the objects of submits that
never made a job (their replica died while it read them). Every replica sweeps; the store hands each entry to
one of them, and counts its bytes off the client's storage then."""

import asyncio
import logging
import time

from .objects import OBJECT_STORE_ERRORS, ObjectStore
from .store import STORE_ERRORS, Store

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 5.0
BATCH = 100
ABANDONED_UPLOAD_SECONDS = 6 * 3600  # an upload no job took this long after it began: its replica died


class Sweeper:
    def __init__(self, store: Store, objects: ObjectStore):
        self.store, self.objects = store, objects

    async def run_forever(self) -> None:
        while True:
            try:
                while await self.sweep() == BATCH:
                    pass
            except (*STORE_ERRORS, *OBJECT_STORE_ERRORS) as error:
                logger.warning("jobs: expired objects are deleted later: %r", error)
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep(self) -> int:
        """One batch of what is due; how many entries it found."""
        now = time.time()
        due = await self.store.due_expiring(now, BATCH)
        for entry, fields in due:
            if fields.get("objects"):  # none for a job of a version that kept its images in Redis
                await self.objects.delete_prefix(fields["objects"])
            await self.store.expired(entry, fields.get("client", ""))
        abandoned = await self.store.abandoned_uploads(now - ABANDONED_UPLOAD_SECONDS, BATCH)
        for prefix in abandoned:
            logger.warning("jobs: deleting %s, written by a submit that made no job", prefix)
            await self.objects.delete_prefix(prefix)
            await self.store.end_upload(prefix)
        return max(len(due), len(abandoned))
