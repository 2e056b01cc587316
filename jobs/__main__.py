"""`python -m jobs`: the HTTP API, arq's worker and the recovery loop of one replica, in one event loop, until
SIGTERM or SIGINT; then running jobs go back to the queue (they do not count as attempts) and it exits."""

import asyncio
import logging
import signal

from aiohttp import web
from arq.connections import RedisSettings, create_pool

from .api import Services, create_app
from .auth import TorchServeCredentials, load_or_create_token
from .config import JobsConfig
from .store import Store
from .torchserve import TorchServeClient
from .webhooks import WebhookPolicy, WebhookSender
from .worker import JobRunner, Recovery, make_worker, new_replica_name

logger = logging.getLogger("jobs")


async def serve(config: JobsConfig) -> None:
    token = load_or_create_token(config.path("token_file"))
    pool = await create_pool(RedisSettings.from_dsn(config.redis_url))
    store = Store(pool, config.retention_seconds)
    credentials = TorchServeCredentials(config.path("torchserve_key_file"),
                                        config.path("torchserve_token_file") if config.torchserve_token_file else None,
                                        config.torchserve_management_url, config.renew_key_before_seconds)
    torchserve = TorchServeClient(config.torchserve_url, credentials)
    policy = WebhookPolicy(config.webhook_allowlist)
    webhooks = WebhookSender(policy, config.webhook_timeout_seconds)
    await torchserve.start()
    await webhooks.start()
    replica = new_replica_name()
    worker = make_worker(config, pool, JobRunner(config, store, torchserve, webhooks, replica))
    recovery = asyncio.create_task(Recovery(config, store, pool, replica).run_forever())
    working = asyncio.create_task(worker.async_run())
    runner = web.AppRunner(create_app(Services(store, pool, token, policy, webhooks, config.max_attempts),
                                      config.max_request_bytes))
    await runner.setup()
    host, port = config.host_port
    await web.TCPSite(runner, host, port).start()
    logger.info("jobs: replica %s on http://%s:%d, TorchServe %s, token in %s", replica, host, port,
                config.torchserve_url, config.path("token_file"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), working], return_when=asyncio.FIRST_COMPLETED)
    if working in done and working.exception():
        logger.error("jobs: the queue's worker stopped: %r", working.exception())
    await runner.cleanup()
    await worker.close()  # cancels running jobs: each goes back to the queue
    recovery.cancel()
    await webhooks.close()
    await torchserve.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(JobsConfig.from_environment()))


if __name__ == "__main__":
    main()
