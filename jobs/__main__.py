"""`python -m jobs`: the HTTP API, arq's worker and the recovery loop of one replica, in one event loop, until
SIGTERM or SIGINT. It starts whether or not the store can be reached (the API answers 503 until it can), and
exits with status 2, saying why, when the store is a Redis that may evict keys.

On SIGTERM, in this order and within shutdown_seconds: it takes no more jobs and ends its event streams at once
(clients resume on another replica with Last-Event-ID), gives its running jobs back to the queue for another
replica at once (not counted as attempts), then stops answering and exits."""

import asyncio
import logging
import signal

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .api import KEEP_ALIVE_SECONDS, Services, create_app
from .auth import TorchServeCredentials, load_or_create_token
from .checks import ServerDescription
from .config import JobsConfig
from .store import Store, StoreRefused
from .torchserve import TorchServeClient
from .webhooks import WebhookPolicy, WebhookSender
from .worker import JobRunner, QueueWorker, Recovery, new_replica_name

logger = logging.getLogger("jobs")

STORE_REFUSED_EXIT_STATUS = 2
HANDLERS_GRACE_SECONDS = 2  # of shutdown_seconds: for the HTTP handlers still answering when the API stops


def redis_clients(config: JobsConfig) -> tuple[ArqRedis, Redis]:
    """The store's clients, connecting when first used: one for every call, one for the event streams' blocking
    reads (whose socket timeout outlasts a read's wait). Every call is bounded by the socket timeout; a call whose
    connection broke (a Redis that restarted closes them all) is sent once more on a new one."""
    def client(cls, read_timeout: float):
        return cls.from_url(config.redis_url, socket_timeout=read_timeout,
                            socket_connect_timeout=config.redis_timeout_seconds,
                            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 1),
                            retry_on_error=[RedisConnectionError])
    return (client(ArqRedis, config.redis_timeout_seconds),
            client(Redis, KEEP_ALIVE_SECONDS + config.redis_timeout_seconds))


async def serve(config: JobsConfig) -> int:
    """The replica's life; its exit status."""
    token = load_or_create_token(config.path("token_file"))
    pool, stream_redis = redis_clients(config)
    store = Store(pool, stream_redis, config.retention_seconds)
    credentials = TorchServeCredentials(config.path("torchserve_key_file"),
                                        config.path("torchserve_token_file") if config.torchserve_token_file else None,
                                        config.torchserve_management_url, config.renew_key_before_seconds)
    torchserve = TorchServeClient(config.torchserve_url, config.torchserve_management_url, credentials)
    policy = WebhookPolicy(config.webhook_allowlist)
    webhooks = WebhookSender(policy, config.webhook_timeout_seconds)
    await torchserve.start()
    await webhooks.start()
    replica = new_replica_name()
    queue = QueueWorker(config, pool, JobRunner(config, store, pool, torchserve, webhooks, replica))
    server = ServerDescription(torchserve.describe)
    background = [asyncio.create_task(Recovery(config, store, pool, queue.in_progress_seconds).run_forever()),
                  asyncio.create_task(server.refresh_forever())]
    working = asyncio.create_task(queue.run())
    services = Services(store, pool, token, policy, webhooks, server)
    runner = web.AppRunner(create_app(services, config.max_request_bytes), shutdown_timeout=HANDLERS_GRACE_SECONDS)
    await runner.setup()
    host, port = config.host_port
    await web.TCPSite(runner, host, port).start()
    logger.info("jobs: replica %s on http://%s:%d, TorchServe %s, token in %s", replica, host, port,
                config.torchserve_url, config.path("token_file"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await asyncio.wait([asyncio.create_task(stop.wait()), working], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if working.done():
        refused = working.exception()
        if not isinstance(refused, StoreRefused):
            raise refused or RuntimeError("the queue's worker ended")
        logger.error("jobs: refusing to run: %s", refused)
        status = STORE_REFUSED_EXIT_STATUS
    ends = asyncio.get_running_loop().time() + config.shutdown_seconds
    services.stopping.set()  # event streams end, new ones send what there is and end
    try:
        await asyncio.wait_for(queue.stop(), config.shutdown_seconds - HANDLERS_GRACE_SECONDS)
    except TimeoutError:
        logger.warning("jobs: not every running job was given back within shutdown_seconds: their leases lapse "
                       "and other replicas take them")
    for task in (working, *background):
        task.cancel()
    await runner.cleanup()  # within HANDLERS_GRACE_SECONDS
    await webhooks.close(timeout=max(0.0, ends - asyncio.get_running_loop().time()))
    await torchserve.close()
    await asyncio.gather(pool.aclose(), stream_redis.aclose(), return_exceptions=True)
    return status


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(JobsConfig.from_environment()))


if __name__ == "__main__":
    raise SystemExit(main())
