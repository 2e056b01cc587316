"""Webhooks: which URLs a job may name (checked at submit), and their delivery from the outbox in the store.

Where they may go. A webhook makes this service send requests where a client says: without limits, a way into
the network it runs in (SSRF). So a URL must be http(s), its host must match the configured allowlist, its port
must be 80 or 443 unless the matching entry names it (`hooks.example.com:8443`, `127.0.0.1/32:9000`), and every
address the host resolves to must be public, unless an address range of the allowlist names it (a local
receiver needs e.g. "127.0.0.1/32:9000"). Delivery checks the URL again and resolves the host through the same
check (the connector's resolver), so a name that resolved to a public address at submit and to a private one
later (DNS rebinding) is refused, and redirects are not followed.

How they arrive. The transition that changes a job writes the delivery of its event, when the job's webhook
asked for it, to the outbox in the same atomic step (store.py): a replica killed a moment later loses nothing.
Every replica takes due deliveries from the outbox (a claim that lapses, so that a replica that dies mid-try
leaves its deliveries to the others), signs each try as Standard Webhooks says (headers webhook-id,
webhook-timestamp, webhook-signature: `v1,<base64 HMAC-SHA256 of id.timestamp.body>` with each secret of the
secret file, so that a secret can be rotated), and POSTs it. A try that gets no 2xx is tried again after a
growing, jittered wait (webhook_first_retry_seconds doubling, at most MAX_RETRY_WAIT_SECONDS) until
webhook_retry_seconds have passed since the delivery was made; every try has the delivery's one webhook-id, by
which receivers drop repeats. A replica keeps at most webhook_concurrency_per_endpoint tries in flight to one
endpoint (scheme, host and port) and MAX_IN_FLIGHT in all.
"""

import asyncio
import base64
import fnmatch
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from redis.asyncio import Redis
from standardwebhooks import Webhook

from .config import JobsConfig
from .store import COUNTERS, OUTBOX, PREFIX, STORE_ERRORS

logger = logging.getLogger(__name__)

DEFAULT_PORTS = (80, 443)
MAX_RETRY_WAIT_SECONDS = 3600.0
MAX_IN_FLIGHT = 64  # tries one replica has under way at once
POLL_SECONDS = 0.5  # how often a replica looks for due deliveries
BUSY_ENDPOINT_WAIT_SECONDS = 1.0  # a delivery whose endpoint has all its tries in flight waits this long
CLAIM_MARGIN_SECONDS = 5.0  # a claim outlasts the try's timeout by this much
SECRET_PREFIX = "whsec_"


class WebhookRefused(ValueError):
    pass


@dataclass(frozen=True)
class _Entry:
    """One allowlist entry: a host pattern or an address range, and the port it names (None: 80 and 443)."""
    host: str | None
    network: object | None
    port: int | None

    def allows_port(self, port: int) -> bool:
        return port in DEFAULT_PORTS or port == self.port


def _parse_entry(entry: str) -> _Entry:
    text, port = entry, None
    if text.startswith("["):  # [2001:db8::/32]:8443 or [::1]
        inside, _, rest = text[1:].partition("]")
        text, port = inside, rest.removeprefix(":") or None
    elif text.count(":") == 1:  # host:port, 10.0.0.0/8:9000 (an IPv6 range has more colons)
        text, port = text.split(":")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"webhook allowlist entry {entry!r}: the port must be a number from 1 to 65535")
    port = int(port) if port is not None else None
    try:
        return _Entry(None, ipaddress.ip_network(text, strict=False), port)
    except ValueError:
        return _Entry(text.lower(), None, port)


class WebhookPolicy:
    def __init__(self, allowlist: list[str]):
        entries = [_parse_entry(entry) for entry in allowlist]
        self.networks = [entry for entry in entries if entry.network is not None]
        self.hosts = [entry for entry in entries if entry.host is not None]

    def check_target(self, url: str) -> tuple[str, int]:
        """The URL's host and port, checked against the allowlist without resolving the host; WebhookRefused,
        saying why, when it may not receive webhooks."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused("the webhook must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise WebhookRefused("the webhook URL may not carry credentials")
        if not self.networks and not self.hosts:
            raise WebhookRefused("webhooks are not enabled on this server (STYLE_JOBS_WEBHOOK_ALLOW is empty)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise WebhookRefused("the webhook URL's port is not a number from 0 to 65535") from None
        host = parts.hostname.lower()
        if _address(host) is None:
            matching = [entry for entry in self.hosts if fnmatch.fnmatchcase(host, entry.host)]
            if not matching:
                raise WebhookRefused(f"the webhook host {host} is not in the server's allowlist")
            if not any(entry.allows_port(port) for entry in matching):
                raise _port_refused(host, port)
        return host, port

    async def check_url(self, url: str) -> None:
        """Raise WebhookRefused, saying why, unless `url` may receive webhooks."""
        host, port = self.check_target(url)
        await self.resolve(host, port)

    async def resolve(self, host: str, port: int) -> list[dict]:
        """The host's addresses (aiohttp's resolver format), each checked; WebhookRefused if any is not allowed."""
        try:
            found = await DefaultResolver().resolve(host, port, socket.AF_UNSPEC)
        except OSError as error:
            raise WebhookRefused(f"the webhook host {host} does not resolve ({error})") from None
        for entry in found:
            self._check_address(host, ipaddress.ip_address(entry["host"]), port)
        return found

    def _check_address(self, host: str, address, port: int) -> None:
        ranges = [entry for entry in self.networks if address in entry.network]
        if ranges:
            if not any(entry.allows_port(port) for entry in ranges):
                raise _port_refused(str(address), port)
            return
        if _address(host) is not None:
            raise WebhookRefused(f"the webhook address {address} is not in the server's allowlist")
        if not address.is_global or address.is_multicast:
            raise WebhookRefused(f"the webhook host {host} resolves to {address}, a loopback, private or reserved "
                                 f"address, which the server's allowlist does not permit")


def _port_refused(host: str, port: int) -> WebhookRefused:
    return WebhookRefused(f"the webhook port {port} is not allowed: webhooks go to ports 80 and 443 unless an "
                          f"allowlist entry names the port (e.g. {host}:{port})")


class _CheckedResolver(AbstractResolver):
    def __init__(self, policy: WebhookPolicy):
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[dict]:
        try:
            return await self.policy.resolve(host, port)
        except WebhookRefused as error:
            raise OSError(str(error)) from None

    async def close(self) -> None:
        pass


def load_or_create_secrets(path: Path) -> list[str]:
    """The signing secrets of the file, one `whsec_<base64>` a line (the first signs, all are sent: a new one
    is added first, the old one removed once receivers know the new one); a new random one written there
    (0600) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        logger.info("jobs: wrote a new webhook signing secret to %s", path)
    found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found or not all(line.startswith(SECRET_PREFIX) for line in found):
        raise ValueError(f"{path}: each line must be a secret {SECRET_PREFIX}<base64>")
    return found


class Signer:
    def __init__(self, secret_lines: list[str]):
        self.webhooks = [Webhook(line) for line in secret_lines]

    def headers(self, delivery: str, body: str, at: float) -> dict[str, str]:
        """Standard Webhooks' headers for one try of a delivery, signed at `at` (epoch s)."""
        when = datetime.fromtimestamp(int(at), tz=timezone.utc)
        return {"webhook-id": delivery, "webhook-timestamp": str(int(at)),
                "webhook-signature": " ".join(webhook.sign(delivery, when, body) for webhook in self.webhooks)}


def retry_wait(failed_tries: int, first: float) -> float:
    """The wait after the `failed_tries`-th failed try: `first` doubling, at most MAX_RETRY_WAIT_SECONDS, each
    drawn between half and all of it (replicas and endpoints do not retry in step)."""
    step = min(first * 2 ** (failed_tries - 1), MAX_RETRY_WAIT_SECONDS)
    return random.uniform(step / 2, step)


# KEYS: outbox; ARGV: now, claimed until, most. The due deliveries, each claimed until then: {id, url, body,
# failed tries, made at, job, event}
_CLAIM = f"""
local found = {{}}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  local f = redis.call('HMGET', '{PREFIX}webhook:' .. id, 'url', 'body', 'tries', 'created', 'job', 'event')
  if f[1] then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(found, {{id, f[1], f[2], f[3], f[4], f[5], f[6]}})
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return found
"""
# KEYS: outbox, the delivery; ARGV: id, what happened (delivered, failed, given_up, postponed), due (epoch s)
_SETTLE = f"""
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if ARGV[2] == 'delivered' or ARGV[2] == 'given_up' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
if ARGV[2] == 'failed' or ARGV[2] == 'given_up' then
  redis.call('HINCRBY', KEYS[2], 'tries', 1)
  redis.call('HINCRBY', '{COUNTERS}', 'webhooks_failed_tries', 1)
end
if ARGV[2] == 'delivered' or ARGV[2] == 'given_up' then
  redis.call('HINCRBY', '{COUNTERS}', 'webhooks_' .. ARGV[2], 1)
end
return 1
"""


@dataclass(frozen=True)
class Delivery:
    id: str
    url: str
    body: str
    failed_tries: int
    created: float
    job: str
    event: str


class WebhookSender:
    """Takes due deliveries from the outbox and tries them (see the module's doc)."""

    def __init__(self, redis: Redis, policy: WebhookPolicy, signer: Signer, config: JobsConfig):
        self.redis, self.policy, self.signer = redis, policy, signer
        self.timeout, self.first_retry = config.webhook_timeout_seconds, config.webhook_first_retry_seconds
        self.retry_for, self.per_endpoint = config.webhook_retry_seconds, config.webhook_concurrency_per_endpoint
        self._claim, self._settle = redis.register_script(_CLAIM), redis.register_script(_SETTLE)
        self.session: aiohttp.ClientSession | None = None
        self.in_flight: dict[str, int] = {}  # endpoint -> tries under way
        self.tasks: set[asyncio.Task] = set()
        self._freed = asyncio.Event()

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_CheckedResolver(self.policy)))

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for the tries under way; those left are dropped, and their claims lapse for
        another replica to try them again."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)
        for task in self.tasks:
            task.cancel()
        if self.session is not None:
            await self.session.close()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.take_due()
            except STORE_ERRORS as error:
                logger.warning("jobs: webhooks: the store cannot be reached (%r)", error)
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), POLL_SECONDS)
            except TimeoutError:
                pass

    async def take_due(self) -> None:
        room = MAX_IN_FLIGHT - len(self.tasks)
        if room <= 0:
            return
        now = time.time()
        claimed = await self._claim(keys=[OUTBOX], args=[now, now + self.timeout + CLAIM_MARGIN_SECONDS, room])
        for fields in claimed:
            delivery = Delivery(*(field.decode() for field in fields[:3]), int(fields[3]), float(fields[4]),
                                *(field.decode() for field in fields[5:]))
            endpoint = _endpoint(delivery.url)
            if self.in_flight.get(endpoint, 0) >= self.per_endpoint:
                await self._settle_as(delivery, "postponed", now + BUSY_ENDPOINT_WAIT_SECONDS)
                continue
            self.in_flight[endpoint] = self.in_flight.get(endpoint, 0) + 1
            task = asyncio.create_task(self._try(delivery))
            self.tasks.add(task)
            task.add_done_callback(lambda done, endpoint=endpoint: self._done(done, endpoint))

    def _done(self, task: asyncio.Task, endpoint: str) -> None:
        self.tasks.discard(task)
        self.in_flight[endpoint] -= 1
        if not self.in_flight[endpoint]:
            del self.in_flight[endpoint]
        self._freed.set()

    async def _try(self, delivery: Delivery) -> None:
        failure = await self._post(delivery)
        try:
            if failure is None:
                await self._settle_as(delivery, "delivered", 0)
                return
            failed = delivery.failed_tries + 1
            due = time.time() + retry_wait(failed, self.first_retry)
            if due - delivery.created > self.retry_for:
                logger.error("jobs: webhook %s of job %s (%s) given up after %d tries over %.0f s: %s", delivery.id,
                             delivery.job, delivery.event, failed, time.time() - delivery.created, failure)
                await self._settle_as(delivery, "given_up", 0)
            else:
                logger.warning("jobs: webhook %s of job %s (%s), try %d: %s; again in %.1f s", delivery.id,
                               delivery.job, delivery.event, failed, failure, due - time.time())
                await self._settle_as(delivery, "failed", due)
        except STORE_ERRORS as error:  # its claim lapses: it is tried again
            logger.warning("jobs: webhook %s: cannot record its try (%r)", delivery.id, error)

    async def _post(self, delivery: Delivery) -> str | None:
        """One try; None when the receiver took it (2xx), else what went wrong."""
        try:
            self.policy.check_target(delivery.url)
        except WebhookRefused as refused:
            return str(refused)
        headers = {"Content-Type": "application/json", "X-Style-Job-Id": delivery.job,
                   "X-Style-Event": delivery.event, **self.signer.headers(delivery.id, delivery.body, time.time())}
        try:
            async with self.session.post(delivery.url, data=delivery.body.encode(), headers=headers,
                                         allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                return None if 200 <= response.status < 300 else f"answered {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            return f"failed: {error!r}"

    async def _settle_as(self, delivery: Delivery, outcome: str, due: float) -> None:
        await self._settle(keys=[OUTBOX, f"{PREFIX}webhook:{delivery.id}"], args=[delivery.id, outcome, due])


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _address(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
