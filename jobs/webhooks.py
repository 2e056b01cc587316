"""Webhooks: which URLs a job may name (checked at submit), and their delivery (checked again at connect).

A webhook makes this service send requests where a client says: without limits, a way into the network it
runs in (SSRF). So a URL must be http(s), its host must match the configured allowlist, and every address the
host resolves to must be public, unless an address range of the allowlist names it (a local receiver needs
e.g. "127.0.0.1/32"). Delivery resolves the host again through the same check (the connector's resolver), so
a name that resolved to a public address at submit and to a private one later (DNS rebinding) is refused, and
redirects are not followed.
"""

import asyncio
import fnmatch
import ipaddress
import json
import logging
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

logger = logging.getLogger(__name__)

DELIVERY_DELAYS = (0, 2, 10)  # s before each try: a receiver that is briefly down still gets the event


class WebhookRefused(ValueError):
    pass


class WebhookPolicy:
    def __init__(self, allowlist: list[str]):
        self.networks, self.hosts = [], []
        for entry in allowlist:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.append(entry.lower())

    async def check_url(self, url: str) -> None:
        """Raise WebhookRefused, saying why, unless `url` may receive webhooks."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused("the webhook must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise WebhookRefused("the webhook URL may not carry credentials")
        if not self.networks and not self.hosts:
            raise WebhookRefused("webhooks are not enabled on this server (STYLE_JOBS_WEBHOOK_ALLOW is empty)")
        host = parts.hostname.lower()
        literal = _address(host)
        if literal is None and not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts):
            raise WebhookRefused(f"the webhook host {host} is not in the server's allowlist")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await self.resolve(host, port)

    async def resolve(self, host: str, port: int) -> list[dict]:
        """The host's addresses (aiohttp's resolver format), each checked; WebhookRefused if any is not allowed."""
        try:
            found = await DefaultResolver().resolve(host, port, socket.AF_UNSPEC)
        except OSError as error:
            raise WebhookRefused(f"the webhook host {host} does not resolve ({error})") from None
        for entry in found:
            self._check_address(host, ipaddress.ip_address(entry["host"]))
        return found

    def _check_address(self, host: str, address) -> None:
        if any(address in network for network in self.networks):
            return
        if _address(host) is not None:
            raise WebhookRefused(f"the webhook address {address} is not in the server's allowlist")
        if not address.is_global or address.is_multicast:
            raise WebhookRefused(f"the webhook host {host} resolves to {address}, a loopback, private or reserved "
                                 f"address, which the server's allowlist does not permit")


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


class WebhookSender:
    """Delivers events in the background: a slow or failing receiver never holds up a job."""

    def __init__(self, policy: WebhookPolicy, timeout: float):
        self.policy, self.timeout = policy, timeout
        self.session: aiohttp.ClientSession | None = None
        self.pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_CheckedResolver(self.policy)))

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for the deliveries under way; what is left then is not delivered."""
        if self.pending:
            await asyncio.wait(self.pending, timeout=timeout)
        if self.session is not None:
            await self.session.close()

    def notify(self, job: dict, event: str, body: dict) -> None:
        """Send `body` to the job's webhook if it asked for `event`."""
        settings = json.loads(job.get("job") or "{}")
        if not settings.get("webhook") or event not in settings.get("webhook_events", ()):
            return
        task = asyncio.get_running_loop().create_task(self._deliver(settings["webhook"], job["id"], event, body))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _deliver(self, url: str, job_id: str, event: str, body: dict) -> None:
        payload = json.dumps({"event": event, "job": body}).encode()
        for delay in DELIVERY_DELAYS:
            await asyncio.sleep(delay)
            try:
                async with self.session.post(url, data=payload, allow_redirects=False,
                                             headers={"Content-Type": "application/json",
                                                      "X-Style-Job-Id": job_id, "X-Style-Event": event},
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                    if response.status < 300:
                        return
                    logger.warning("jobs: webhook of %s (%s) answered %s", job_id, event, response.status)
                    if response.status < 500:
                        return  # the receiver refuses it: trying again changes nothing
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                logger.warning("jobs: webhook of %s (%s) failed: %s", job_id, event, error)
        logger.error("jobs: webhook of %s (%s) not delivered after %d tries", job_id, event, len(DELIVERY_DELAYS))


def _address(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
