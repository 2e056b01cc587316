"""GET /jobs/{id}/events: server-sent events, bounded in what they cost the store and the replica.

One reader per replica (EventHub) waits for new events of every job that has a stream open on it, with one
blocking XREAD over all their streams, and hands each event to every stream of its job: ten thousand idle
streams hold one Redis connection, not ten thousand. A stream first replays what it missed (after its
Last-Event-ID) with plain reads, then takes what the hub hands it; events it has already sent are skipped by
their id. The hub is woken through a stream of its own when a job is added, so that its blocking read includes
it at once.

Bounds: a client has at most max_streams_per_client open on one replica (429 with Retry-After past that); a
write that the client does not take within stream_write_timeout_seconds ends its stream (a client that stopped
reading holds nothing); a stream whose client reads too slowly for the events falls behind its queue and is
ended (the client resumes with Last-Event-ID); and every stream ends after event_stream_seconds, its `retry:`
field telling the client when to reconnect with Last-Event-ID (each stream's own, so that clients come back
spread out). A replica that stops ends its streams at once.
"""

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections import defaultdict

from aiohttp import web
from redis.asyncio import Redis

from .store import END_EVENTS, PREFIX, STORE_ERRORS, Store, key

logger = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 15  # an SSE comment this often: proxies that cut idle connections (60 s) see traffic
QUEUE_EVENTS = 256  # events waiting for one stream's client; past that the stream is ended
READ_COUNT = 100
RECONNECT_MS = (1000, 3000)  # the `retry:` a stream gives its client, drawn in this range
STORE_RETRY_SECONDS = 1.0


def stream_id(entry: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry.partition("-")
    return int(milliseconds), int(sequence or 0)


class Subscription:
    """One stream's share of the hub: the events of its job as the hub reads them."""

    def __init__(self, ref: str):
        self.ref = ref
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_EVENTS)
        self.ended: str | None = None  # why the hub can hand it nothing more

    def offer(self, entry) -> None:
        if self.ended is None:
            try:
                self.queue.put_nowait(entry)
            except asyncio.QueueFull:
                self.end("its client reads too slowly")

    def end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)


class EventHub:
    """The replica's one reader of the jobs' event streams (see the module's doc)."""

    def __init__(self, store: Store, stream_redis: Redis):
        self.store, self.redis = store, stream_redis
        self.cursors: dict[str, str] = {}  # ref -> the last event id read for it
        self.subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self.wake_key = f"{PREFIX}wake:{uuid.uuid4().hex}"
        self.wake_cursor = "0-0"
        self.reading: asyncio.Task | None = None

    async def subscribe(self, ref: str) -> Subscription:
        subscription = Subscription(ref)
        self.subscribers[ref].add(subscription)
        if ref not in self.cursors:
            last = await self.store.last_event_id(ref)
            # another stream of the job may have begun meanwhile: its cursor may have moved on, never back
            if self.cursors.setdefault(ref, last) == last:
                await self._wake()
        if self.reading is None or self.reading.done():
            self.reading = asyncio.create_task(self._read_forever())
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        watching = self.subscribers.get(subscription.ref)
        if watching is not None:
            watching.discard(subscription)
            if not watching:
                del self.subscribers[subscription.ref]
                self.cursors.pop(subscription.ref, None)

    def end_all(self, why: str) -> None:
        for watching in list(self.subscribers.values()):
            for subscription in list(watching):
                subscription.end(why)

    async def close(self) -> None:
        self.end_all("the replica is stopping")
        if self.reading is not None:
            self.reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, *STORE_ERRORS):
                await self.reading
        with contextlib.suppress(*STORE_ERRORS):
            await self.store.redis.delete(self.wake_key)

    async def _wake(self) -> None:
        """Make the blocking read start again with the jobs watched now."""
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {"wake": 1}, maxlen=1)
            pipe.expire(self.wake_key, 3600)
            await pipe.execute()

    async def _read_forever(self) -> None:
        while self.cursors:
            streams = {key("events", ref): cursor for ref, cursor in self.cursors.items()}
            streams[self.wake_key] = self.wake_cursor
            try:
                found = await self.redis.xread(streams, block=KEEP_ALIVE_SECONDS * 1000, count=READ_COUNT)
            except STORE_ERRORS as error:
                logger.warning("jobs: event streams: the store cannot be reached (%r): they end", error)
                self.end_all("the store cannot be reached")
                await asyncio.sleep(STORE_RETRY_SECONDS)
                continue
            for name, entries in found:
                name = name.decode()
                if name == self.wake_key:
                    self.wake_cursor = entries[-1][0].decode()
                    continue
                ref = name.removeprefix(f"{PREFIX}events:")
                if ref not in self.cursors:
                    continue  # its last stream ended meanwhile
                for entry_id, fields in entries:
                    event = (entry_id.decode(), fields[b"event"].decode(), json.loads(fields[b"data"]))
                    for subscription in list(self.subscribers.get(ref, ())):
                        subscription.offer(event)
                self.cursors[ref] = entries[-1][0].decode()


class TimedWriter:
    """Writes to a streamed answer, each within a time limit: a client that stops reading holds nothing."""

    def __init__(self, response: web.StreamResponse, write_timeout: float):
        self.response, self.write_timeout = response, write_timeout

    async def write(self, text: str) -> None:
        await self.write_bytes(text.encode())

    async def write_bytes(self, data: bytes) -> None:
        """Raises TimeoutError when the client does not take it in time."""
        await asyncio.wait_for(self.response.write(data), self.write_timeout)


class EventStream(TimedWriter):
    """One client's stream of one job's events."""

    def __init__(self, response: web.StreamResponse, write_timeout: float):
        super().__init__(response, write_timeout)
        self.last: tuple[int, int] = (0, 0)

    async def send(self, event: tuple[str, str, dict]) -> bool:
        """Send the event unless it was sent already; whether it ends the job."""
        entry_id, name, data = event
        if stream_id(entry_id) <= self.last:
            return False
        await self.write(f"id: {entry_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n")
        self.last = stream_id(entry_id)
        return name in END_EVENTS.values()


async def follow(stream: EventStream, hub: EventHub, store: Store, ref: str, after: str, ended: bool,
                 lifetime: float, stopping: asyncio.Event) -> None:
    """Send the job's events after `after` until its end event, its stream's lifetime, or the replica stops.
    `ended`: the job had ended when the stream began (all its events are written: nothing to wait for)."""
    deadline = asyncio.get_running_loop().time() + lifetime
    await stream.write(f"retry: {random.randint(*RECONNECT_MS)}\n\n")
    subscription = None if ended else await hub.subscribe(ref)
    try:
        stream.last = stream_id(after)
        while True:  # what came before the stream was live: from the store
            found = await store.events(ref, f"{stream.last[0]}-{stream.last[1]}", READ_COUNT)
            for event in found:
                if await stream.send(event):
                    return
            if len(found) < READ_COUNT:
                break
        if subscription is None:
            return
        await _live(stream, subscription, deadline, stopping)
    finally:
        if subscription is not None:
            hub.unsubscribe(subscription)


async def _live(stream: EventStream, subscription: Subscription, deadline: float, stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while (left := deadline - loop.time()) > 0:
            taking = asyncio.ensure_future(subscription.queue.get())
            done, _ = await asyncio.wait({taking, stop}, timeout=min(left, KEEP_ALIVE_SECONDS),
                                         return_when=asyncio.FIRST_COMPLETED)
            if taking not in done:
                taking.cancel()
                if stop in done:
                    return
                await stream.write(": keep-alive\n\n")
                continue
            event = taking.result()
            if event is None or await stream.send(event):
                return  # the hub ended it (the client resumes with Last-Event-ID), or the job ended
    finally:
        stop.cancel()
