"""`python -m jobs`: the HTTP API, its metrics, arq's worker, the recovery loop, the webhooks' sender, the
sweeper of expired objects and the mover of the previous release's jobs (upgrade.py) of one replica, in one
event loop, until SIGTERM or SIGINT. It starts whether or not the store can be reached (the API answers 503
until it can), and exits with status 2, saying why, when the store is a Redis that may evict keys.

On SIGTERM, in this order and within shutdown_seconds: it takes no more jobs and ends its event streams at once
(clients resume on another replica with Last-Event-ID), gives its running jobs back to the queue for another
replica at once (not counted as attempts), then stops answering, lets the webhook tries under way finish in what
time is left (the others' claims lapse: another replica tries them) and exits."""

import asyncio
import logging
import signal

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .api import Services, create_app, metrics_app
from .auth import Clients, TorchServeCredentials
from .checks import ServerDescription
from .config import JobsConfig
from .events import KEEP_ALIVE_SECONDS, EventHub
from .objects import object_store
from .retention import Sweeper
from .store import Store, StoreRefused
from .submission import MemoryBudget
from .torchserve import TorchServeClient
from .upgrade import Upgrade
from .webhooks import Signer, WebhookPolicy, WebhookSender, load_or_create_secrets
from .worker import JobRunner, QueueWorker, Recovery, new_replica_name

logger = logging.getLogger("jobs")

STORE_REFUSED_EXIT_STATUS = 2
HANDLERS_GRACE_SECONDS = 2  # of shutdown_seconds: for the HTTP handlers still answering when the API stops
METRICS_CLIENT_NAME = "style-jobs-metrics"
STORE_CONNECTIONS = 64


def redis_clients(config: JobsConfig) -> tuple[ArqRedis, Redis, Redis]:
    """The store's clients, connecting when first used: one for every call, one for the event streams' blocking
    reads (whose socket timeout outlasts a read's wait), and one for the metrics (named, so that the store's
    operators tell its few reads apart). Every call is bounded by the socket timeout; a call whose connection
    broke (a Redis that restarted closes them all) is sent once more on a new one. A replica holds at most
    STORE_CONNECTIONS connections for its calls, however many come at once: a call waits for one of them as
    long as for an answer."""
    def client(cls, read_timeout: float, connections: int, **more):
        pool = BlockingConnectionPool.from_url(
            config.redis_url, max_connections=connections, timeout=config.redis_timeout_seconds,
            socket_timeout=read_timeout, socket_connect_timeout=config.redis_timeout_seconds,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 1), retry_on_error=[RedisConnectionError], **more)
        return cls.from_pool(pool)
    return (client(ArqRedis, config.redis_timeout_seconds, STORE_CONNECTIONS),
            client(Redis, KEEP_ALIVE_SECONDS + config.redis_timeout_seconds, 2),
            client(Redis, config.redis_timeout_seconds, 2, client_name=METRICS_CLIENT_NAME))


async def serve(config: JobsConfig) -> int:
    """The replica's life; its exit status."""
    clients = Clients(config.path("token_file"))
    signer = Signer(load_or_create_secrets(config.path("webhook_secret_file")))
    pool, stream_redis, metrics_redis = redis_clients(config)
    store = Store(pool, stream_redis, config.retention_seconds)
    objects = object_store(config.object_store, config.s3_endpoint_url, config.s3_region)
    credentials = TorchServeCredentials(config.path("torchserve_key_file"),
                                        config.path("torchserve_token_file") if config.torchserve_token_file else None,
                                        config.torchserve_management_url, config.renew_key_before_seconds)
    torchserve = TorchServeClient(config.torchserve_url, config.torchserve_management_url, credentials)
    policy = WebhookPolicy(config.webhook_allowlist)
    webhooks = WebhookSender(pool, policy, signer, config)
    await objects.start()
    await torchserve.start()
    await webhooks.start()
    replica = new_replica_name()
    queue = QueueWorker(config, pool, JobRunner(config, store, pool, objects, torchserve, replica))
    server = ServerDescription(torchserve.describe)
    hub = EventHub(store, stream_redis)
    upgrade = Upgrade(store, pool, objects, replica)
    background = [asyncio.create_task(Recovery(config, store, pool, queue.task_queue).run_forever()),
                  asyncio.create_task(server.refresh_forever()), asyncio.create_task(webhooks.run_forever()),
                  asyncio.create_task(Sweeper(store, objects).run_forever()),
                  asyncio.create_task(upgrade.run_forever(config.lease_seconds / 3))]
    working = asyncio.create_task(queue.run())
    services = Services(config, store, pool, objects, clients, policy, server, hub,
                        MemoryBudget(config.upload_memory_bytes), upgrade)
    runners = [web.AppRunner(create_app(services), shutdown_timeout=HANDLERS_GRACE_SECONDS)]
    sites = [config.host_port]
    if config.metrics_host_port is not None:
        runners.append(web.AppRunner(metrics_app(services, metrics_redis, config.path("metrics_token_file")
                                                 if config.metrics_token_file else None)))
        sites.append(config.metrics_host_port)
    for runner, (host, port) in zip(runners, sites):
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    logger.info("jobs: replica %s on http://%s:%d (metrics: %s), TorchServe %s, objects in %s, %d clients", replica,
                *config.host_port, config.metrics_listen or "none", config.torchserve_url, config.object_store,
                len(clients.tokens))
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
    hub.end_all("the replica is stopping")
    try:
        await asyncio.wait_for(queue.stop(), config.shutdown_seconds - HANDLERS_GRACE_SECONDS)
    except TimeoutError:
        logger.warning("jobs: not every running job was given back within shutdown_seconds: their leases lapse "
                       "and other replicas take them")
    for task in (working, *background):
        task.cancel()
    for runner in runners:
        await runner.cleanup()  # within HANDLERS_GRACE_SECONDS
    await webhooks.close(timeout=max(0.0, ends - asyncio.get_running_loop().time()))
    await hub.close()
    await torchserve.close()
    await objects.close()
    await asyncio.gather(pool.aclose(), stream_redis.aclose(), metrics_redis.aclose(), return_exceptions=True)
    return status


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(JobsConfig.from_environment()))


if __name__ == "__main__":
    raise SystemExit(main())
