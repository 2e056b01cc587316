"""The jobs service at cluster scale (docs/jobs.md), against a real Redis, a real S3-compatible
server (moto's) and a real TorchServe: images out of Redis and memory bounded however many large submits come,
clients apart, quotas, webhooks that are signed and arrive through a replica's death, event streams that cost
one store reader and end on time, metrics whose cost does not grow with the jobs, objects that expire with
their jobs."""

import asyncio
import hashlib
import json
import os
import re
import resource
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import redis
import redis.asyncio
import requests
import yaml
from arq.connections import ArqRedis

from conftest import ROOT
from jobs.__main__ import STORE_CONNECTIONS
from jobs.api import METRICS
from jobs.config import JobsConfig
from jobs.store import ACTIVE, NewJob, Quotas, Store, job_ref
from jobs.webhooks import MAX_RETRY_WAIT_SECONDS, Signer, WebhookPolicy, WebhookRefused, WebhookSender, retry_wait
from jobs.worker import QueueWorker, Recovery, enqueue
from jobs_calls import (CONTENT, LONG, STYLE, TINY, WebhookReceiver, conforms, read_events, record_key,
                        running_with_progress, status, submit, until, wait_for)
from jobs_instance import JobsInstance
from redis_instance import RedisInstance
from torchserve_instance import free_port

pytestmark = pytest.mark.integration

POD = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "jobs" / "jobs.yaml").read_text())
(JOBS_CONTAINER,) = next(doc for doc in POD if doc and doc["kind"] == "Deployment")["spec"]["template"]["spec"][
    "containers"]
UNITS = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30}


def nowhere() -> str:
    """A TorchServe URL where nothing listens: jobs stay queued."""
    return f"http://127.0.0.1:{free_port()}"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def two_clients(workdir) -> tuple:
    """A token file of two named clients; their Authorization headers."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tokens").write_text("# the jobs service's clients\nalice alice-token-1234\n\nbob bob-token-5678\n")
    return workdir / "tokens", bearer("alice-token-1234"), bearer("bob-token-5678")


def post(service, headers: dict, params: dict = TINY, **extra) -> requests.Response:
    return requests.post(service.url("/jobs"), headers=headers, files={"content": CONTENT, "style": STYLE},
                         data={"params": json.dumps(params), **extra}, timeout=30)


# --- clients apart, quotas ----------------------------------------------------------------------------------------

def test_a_job_is_its_clients_alone_and_so_is_its_idempotency_key(redis_server, tmp_path):
    tokens, alice, bob = two_clients(tmp_path)
    service_retention = 600
    with JobsInstance(tmp_path / "jobs", redis_server.url, token_file=tokens, torchserve_url=nowhere(),
                      retention_seconds=service_retention) as service:
        key = {"Idempotency-Key": f"order-{time.time()}"}
        mine = post(service, {**alice, **key})
        assert mine.status_code == 202, mine.text
        job_id = mine.json()["id"]
        for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/result"), ("POST", "/cancel")):
            answer = requests.request(method, service.url(f"/jobs/{job_id}{path}"), headers=bob, timeout=10)
            assert answer.status_code == 404, (path, answer.text)
            conforms(answer.json(), "JobErrorBody")
        # the same key is bob's own: a job of his, not alice's replayed
        his = post(service, {**bob, **key})
        assert his.status_code == 202 and his.json()["id"] != job_id and "Idempotent-Replayed" not in his.headers
        again = post(service, {**alice, **key})
        assert again.json()["id"] == job_id and again.headers["Idempotent-Replayed"] == "true"
        # kept while the job lives, however long, and for the job's retention after it ends
        kept = f"style-jobs:idempotency:alice:{hashlib.sha256(key['Idempotency-Key'].encode()).hexdigest()}"
        store = redis.Redis.from_url(redis_server.url)
        assert store.get(kept).decode() == job_id and store.ttl(kept) == -1
        # an id chosen with PUT is the client's own too: bob makes his, alice's stays as it was
        chosen = f"order-{int(time.time() * 1000)}"
        put = lambda headers: requests.put(service.url(f"/jobs/{chosen}"), headers=headers,  # noqa: E731
                                           files={"content": CONTENT}, data={"params": json.dumps(TINY)}, timeout=30)
        assert put(alice).status_code == 201 and put(bob).status_code == 201
        requests.post(service.url(f"/jobs/{chosen}/cancel"), headers=bob, timeout=10)
        assert requests.get(service.url(f"/jobs/{chosen}"), headers=alice, timeout=10).json()["status"] == "queued"
        assert requests.get(service.url(f"/jobs/{job_id}"), headers=alice, timeout=10).json()["status"] == "queued"
        requests.post(service.url(f"/jobs/{job_id}/cancel"), headers=alice, timeout=10)
        assert 0 < store.ttl(kept) <= service_retention
        assert requests.get(service.url("/jobs/x"), headers=bearer("nobody"), timeout=10).status_code == 401
        # a token file changed in place (a Secret updated) is read again: bob's token is gone, carol's is new
        tokens.write_text("alice alice-token-1234\ncarol carol-token-0000\n")
        until(lambda: requests.get(service.url(f"/jobs/{job_id}"), headers=bob, timeout=10).status_code == 401,
              service, timeout=10)
        assert requests.get(service.url(f"/jobs/{job_id}"), headers=bearer("carol-token-0000"),
                            timeout=10).status_code == 404


def test_past_a_quota_a_submit_is_429_with_retry_after(tmp_path):
    """Unfinished jobs per client and for the service, and stored bytes per client; a job that ends frees its
    place. A Redis of its own: the service's jobs are counted from none."""
    tokens, alice, bob = two_clients(tmp_path)
    with RedisInstance(tmp_path / "redis") as private, \
            JobsInstance(tmp_path / "jobs", private.url, token_file=tokens, torchserve_url=nowhere(),
                         client_max_unfinished=2, max_unfinished=3, client_max_stored_bytes=600_000) as service:
        key = {"Idempotency-Key": "first"}
        first, second = post(service, {**alice, **key}).json()["id"], post(service, alice).json()["id"]
        over = post(service, alice)
        assert over.status_code == 429 and over.json()["quota"] == "client_jobs", over.text
        assert int(over.headers["Retry-After"]) > 0
        conforms(over.json(), "JobErrorBody")
        replayed = post(service, {**alice, **key})
        assert replayed.status_code == 202 and replayed.json()["id"] == first, "a job that exists is no new one"
        assert post(service, bob).status_code == 202
        service_full = post(service, bob)
        assert service_full.status_code == 429 and service_full.json()["quota"] == "service_jobs"
        requests.post(service.url(f"/jobs/{first}/cancel"), headers=alice, timeout=10)
        assert post(service, alice).status_code == 202, "a job that ended frees its place"
        # bytes: a body that would take bob past his storage is refused before it is read
        big = requests.post(service.url("/jobs"), headers=bob, timeout=30,
                            files={"content": CONTENT + b"\0" * 700_000, "style": STYLE})
        assert big.status_code == 429 and big.json()["quota"] == "client_bytes", big.text
        assert requests.get(service.url(f"/jobs/{second}"), headers=alice, timeout=10).json()["status"] == "queued"


# --- images out of Redis, memory bounded ----------------------------------------------------------------------

def png_padded_to(size: int) -> bytes:
    """A 32x24 PNG of `size` bytes: its pixels, then a private ancillary chunk of zeros that every reader skips
    (after the pixels, so that the header the submit checks read stays at the start)."""
    import io

    from PIL import Image

    pixels = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(pixels, "PNG")
    data = pixels.getvalue()
    padding = size - len(data) - 12

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return data[:-12] + chunk(b"prVt", b"\0" * padding) + data[-12:]


def limit_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()
    return int(number) * UNITS[unit]


def test_forty_large_submits_while_torchserve_is_busy_stay_out_of_redis_and_within_the_pod(
        server, redis_server, s3_server, tmp_path):
    """40 submits of 20 MB at once, while the service's one slot keeps TorchServe busy: their images go to the
    bucket as they arrive, Redis stays under 50 MB and the process under its pod's memory limit, and a body
    comes back from the bucket to TorchServe whole."""
    body = png_padded_to(20_000_000)
    with JobsInstance(tmp_path, redis_server.url, server, env=s3_server.env, concurrency=1,
                      **s3_server.settings("large")) as service:
        busy = submit(service, {**LONG, "max_seconds": 60}).json()["id"]
        wait_for(service, busy, until=running_with_progress, timeout=60)
        process = psutil.Process(service.process.pid)
        peak, sampling = [process.memory_info().rss], threading.Event()

        def sample():
            while not sampling.is_set():
                peak.append(process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(40) as pool:
                answers = list(pool.map(lambda number: requests.post(
                    service.url("/jobs"), headers=service.auth, timeout=300,
                    files={"content": (f"padded-{number}.png", body, "image/png")},
                    data={"params": json.dumps({**TINY, "presets": "starry_night", "seed": number})}), range(40)))
        finally:
            sampling.set()
            sampler.join()
        assert [answer.status_code for answer in answers] == [202] * 40, answers[0].text
        ids = [answer.json()["id"] for answer in answers]
        used = redis.Redis.from_url(redis_server.url).info("memory")["used_memory"]
        stored = s3_server.keys("large/")
        assert len(stored) == 41 and sum(stored.values()) > 40 * 20_000_000
        assert all(status(service, job_id)["status"] == "queued" for job_id in ids), "TorchServe is busy"
        for job_id in [busy, *ids[1:]]:
            requests.post(service.url(f"/jobs/{job_id}/cancel"), headers=service.auth, timeout=10)
        state = wait_for(service, ids[0], timeout=120)
        result = requests.get(service.url(f"/jobs/{ids[0]}/result"), headers=service.auth, timeout=30)
    assert used < 50 * 2 ** 20, f"Redis uses {used} bytes"
    assert max(peak) < limit_bytes(JOBS_CONTAINER["resources"]["limits"]["memory"]), f"peak RSS {max(peak)}"
    assert max(peak) - peak[0] < 2 * JobsConfig.upload_memory_bytes, "bounded by the submits' memory budget"
    assert state["status"] == "succeeded", state
    assert result.status_code == 200 and result.headers["Content-Type"] == "image/png"
    left = s3_server.keys("large/")
    assert not any(key.endswith("/request") for key in left), "requests are deleted when their job ends"


def test_results_and_requests_expire_with_their_jobs(server, redis_server, s3_server, tmp_path):
    store = redis.Redis.from_url(redis_server.url)
    with JobsInstance(tmp_path, redis_server.url, server, env=s3_server.env, retention_seconds=2,
                      **s3_server.settings("expiring")) as service:
        job_id = submit(service, TINY).json()["id"]
        assert wait_for(service, job_id)["status"] == "succeeded"
        (result,) = s3_server.keys("expiring/").items()
        assert "/result-" in result[0], "the request went when the job ended, the result stays"
        assert int(store.hget("style-jobs:client:default", "stored_bytes")) >= result[1]
        until(lambda: requests.get(service.url(f"/jobs/{job_id}"), headers=service.auth,
                                   timeout=10).status_code == 404, service, timeout=10)
        until(lambda: not s3_server.keys("expiring/"), service, timeout=15)
    assert not store.exists(record_key(job_id))


# --- webhooks ----------------------------------------------------------------------------------------------------

def test_a_webhook_arrives_after_the_replica_that_finished_the_job_was_killed(server, redis_server, tmp_path):
    """The `done` delivery is written with the job's end: the replica that ended the job tries it, is
    SIGKILLed, and a replica started afterwards delivers it; every try carries the one webhook-id and a
    signature the Standard Webhooks library verifies."""
    port = free_port()
    settings = {"webhook_allow": f"127.0.0.1/32:{port}", "webhook_first_retry_seconds": 0.3,
                "webhook_timeout_seconds": 2, "object_store": tmp_path / "objects",
                "webhook_secret_file": tmp_path / "webhook_secret"}
    first = JobsInstance(tmp_path / "first", redis_server.url, server, **settings).start()
    try:
        with WebhookReceiver(port, tmp_path / "webhook_secret", refuse_tries=10 ** 6) as receiver:
            job_id = submit(first, TINY, webhook=receiver.url).json()["id"]
            assert wait_for(first, job_id)["status"] == "succeeded"
            until(lambda: len(receiver.tries) >= 2, first, timeout=20)  # refused, and tried again
            first.kill()
            tried_before = len(receiver.tries)
            with JobsInstance(tmp_path / "second", redis_server.url, server, token_file=first.token_file,
                              **settings) as second:
                receiver.refuse_tries = 0  # the receiver is back
                until(lambda: receiver.verified, second, timeout=30)
    finally:
        first.stop()
    assert receiver.refused == [], "every try's signature verifies"
    ((headers, body),) = receiver.verified
    assert body["event"] == "done" and body["job"]["id"] == job_id and body["job"]["status"] == "succeeded"
    assert {webhook_id for webhook_id, _ in receiver.tries} == {headers["webhook-id"]}, "one id for every try"
    assert len(receiver.tries) > tried_before >= 2, "tried by the first replica, then by the second"


def test_deliveries_keep_to_their_endpoints_concurrency_and_retry_with_growing_jittered_waits(tmp_path):
    """A replica's sender against a slow receiver: at most webhook_concurrency_per_endpoint tries under way to
    it, every delivery made; waits after failed tries grow, are jittered and reach an hour at most, so that a
    delivery is tried for as long as webhook_retry_seconds (a day by default, at least an hour)."""
    port = free_port()
    config = JobsConfig(webhook_allow=f"127.0.0.1/32:{port}", webhook_concurrency_per_endpoint=2)
    secret = tmp_path / "secret"
    secret.write_text("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" + "\n")

    async def scenario(receiver: WebhookReceiver, redis_url: str):
        client = redis.asyncio.Redis.from_url(redis_url)
        store = Store(client, client, 60)
        for number in range(6):  # each job's queued event is a delivery
            await store.create(NewJob("default", f"hooked-{number}", f"default/hooked-{number}/n/", 1,
                                      "application/json", "print", "image", receiver.url, ("queued",)),
                               None, Quotas(100, 100, 10 ** 9))
        sender = WebhookSender(client, WebhookPolicy(config.webhook_allowlist),
                               Signer(secret.read_text().split()), config)
        await sender.start()
        sending = asyncio.create_task(sender.run_forever())
        deadline = time.monotonic() + 30
        while len(receiver.verified) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        sending.cancel()
        await sender.close(0)
        await client.aclose()

    with RedisInstance(tmp_path / "redis") as private, WebhookReceiver(port, secret, delay=0.5) as receiver:
        asyncio.run(scenario(receiver, private.url))
    assert len(receiver.verified) == 6 and receiver.refused == []
    assert receiver.most_under_way == 2
    waits = [[retry_wait(tries, 5.0) for tries in range(1, 16)] for _ in range(20)]
    for drawn in waits:
        steps = [min(5.0 * 2 ** (tries - 1), MAX_RETRY_WAIT_SECONDS) for tries in range(1, 16)]
        assert all(step / 2 <= wait <= step for wait, step in zip(drawn, steps)), drawn
    assert len({round(drawn[3], 6) for drawn in waits}) > 1, "jittered"
    assert JobsConfig.webhook_retry_seconds >= 3600


def test_webhook_ports_are_80_and_443_unless_an_entry_names_one():
    check = lambda allow, url: asyncio.run(WebhookPolicy(allow).check_url(url))  # noqa: E731
    check(["127.0.0.1/32:8080"], "http://127.0.0.1:8080/hook")
    check(["127.0.0.1/32"], "http://127.0.0.1/hook")
    for allow, url in ((["127.0.0.1/32"], "http://127.0.0.1:8080/hook"),
                       (["127.0.0.1/32:8081"], "http://127.0.0.1:8080/hook"),
                       (["localhost:9000", "127.0.0.0/8"], "http://localhost:8080/hook")):
        with pytest.raises(WebhookRefused, match="port 8080 is not allowed"):
            check(allow, url)
    check(["localhost:8080", "127.0.0.0/8:8080"], "http://localhost:8080/hook")
    with pytest.raises(ValueError, match="port must be a number"):
        WebhookPolicy(["hooks.example.com:http"])


# --- event streams -----------------------------------------------------------------------------------------------

async def _open_streams(port: int, token: str, ids: list[str], each: int) -> list:
    """`each` event streams of every job, their headers and first event read; the open connections."""
    async def one(job_id: str):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await writer.drain()
        seen = b""
        while b"event: queued" not in seen:
            seen += await reader.read(4096)
        assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
        return reader, writer

    connections = []
    for job_id in ids:
        connections += await asyncio.gather(*(one(job_id) for _ in range(each)))
    return connections


def test_two_thousand_idle_streams_hold_one_store_reader_and_leave_every_other_call_fast(tmp_path):
    """2,000 streams on 20 queued jobs: the replica reads them all with one connection to Redis, other calls
    answer within a second, and an event reaches every stream of its job."""
    wanted = 2000 + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * wanted), hard))  # the service inherits it
    with RedisInstance(tmp_path / "redis") as private, \
            JobsInstance(tmp_path / "jobs", private.url, torchserve_url=nowhere(),
                         max_streams_per_client=2000) as service:
        store = redis.Redis.from_url(private.url)
        ids = [submit(service, TINY).json()["id"] for _ in range(20)]
        loop = asyncio.new_event_loop()
        try:
            connections = loop.run_until_complete(_open_streams(service.port, service.token, ids, 100))
            assert len(connections) == 2000
            clients = store.client_list()
            reading = [client for client in clients if client["cmd"] == "xread" and "b" in client["flags"]]
            assert len(reading) == 1, "one blocking reader for all the streams"
            assert len(clients) < STORE_CONNECTIONS + 8, "the replica's connections are bounded"
            assert requests.get(service.url(f"/jobs/{ids[0]}/events"), headers=service.auth,
                                timeout=10).status_code == 429, "this client's 2,000 are its most"
            slowest = 0.0
            for _ in range(5):
                for call in (lambda: status(service, ids[1]), lambda: submit(service, TINY),
                             lambda: requests.get(service.metrics_url(), timeout=5),
                             lambda: requests.get(service.url("/ping"), timeout=5)):
                    started = time.monotonic()
                    call()
                    slowest = max(slowest, time.monotonic() - started)
            assert slowest < 1.0, f"a call took {slowest:.2f} s"
            canceled_at = time.monotonic()
            requests.post(service.url(f"/jobs/{ids[0]}/cancel"), headers=service.auth, timeout=10)

            async def canceled(reader) -> bool:
                seen = b""
                while b"event: canceled" not in seen:
                    chunk = await asyncio.wait_for(reader.read(4096), 10)
                    if not chunk:
                        return False
                    seen += chunk
                return True

            async def all_of_the_job() -> list[bool]:
                return await asyncio.gather(*(canceled(reader) for reader, _ in connections[:100]))

            told = loop.run_until_complete(all_of_the_job())
            assert all(told) and time.monotonic() - canceled_at < 5, "every stream of the job got the event"
        finally:
            for _, writer in locals().get("connections", []):
                writer.close()
            loop.close()


def test_a_stream_ends_at_its_lifetime_saying_when_to_reconnect_and_resumes_with_last_event_id(redis_server,
                                                                                              tmp_path):
    with JobsInstance(tmp_path, redis_server.url, torchserve_url=nowhere(), event_stream_seconds=1.5,
                      max_streams_per_client=2) as service:
        job_id = submit(service, TINY).json()["id"]
        started = time.monotonic()
        with requests.get(service.url(f"/jobs/{job_id}/events"), headers=service.auth, stream=True,
                          timeout=10) as first:
            text = first.text
        lasted = time.monotonic() - started
        assert 1.4 < lasted < 5, lasted
        retry = re.match(r"retry: (\d+)\n\n", text)
        assert retry and 1000 <= int(retry.group(1)) <= 3000, text
        (queued_id,) = re.findall(r"id: (\S+)\nevent: queued", text)
        requests.post(service.url(f"/jobs/{job_id}/cancel"), headers=service.auth, timeout=10)
        assert [name for _, name, _ in read_events(service, job_id, last_event_id=queued_id)] == ["canceled"]


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout():
    """A stream's writes are bounded in time: a client that reads nothing does not hold its writer."""
    from aiohttp import web

    from jobs.events import TimedWriter

    outcome = {}

    async def flood(request):
        response = web.StreamResponse()
        await response.prepare(request)
        writer = TimedWriter(response, write_timeout=0.5)
        started = time.monotonic()
        try:
            while True:
                await writer.write_bytes(b"x" * 65536)
        except TimeoutError:
            outcome["cut_after"] = time.monotonic() - started
        return response

    async def scenario():
        app = web.Application()
        app.router.add_get("/", flood)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 20
        while "cut_after" not in outcome and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        sock.close()
        await runner.cleanup()

    asyncio.run(scenario())
    assert outcome.get("cut_after", 99) < 10, outcome


# --- metrics -----------------------------------------------------------------------------------------------------

def metrics_commands(private: RedisInstance, service: JobsInstance) -> list[str]:
    """The Redis commands one scrape of /metrics sends (MONITOR, filtered to the metrics' own connection), and
    the scrape's text."""
    (connection,) = [client for client in redis.Redis.from_url(private.url).client_list()
                     if client["name"] == "style-jobs-metrics"]
    monitor_client = redis.Redis.from_url(private.url)
    with monitor_client.monitor() as monitor:
        scrape = requests.get(service.metrics_url(), timeout=10)
        assert scrape.status_code == 200
        redis.Redis.from_url(private.url).echo("scraped")
        commands = []
        for seen in monitor.listen():
            if seen["command"] == "ECHO scraped":
                break
            if seen["client_address"] == connection["addr"].rsplit(":", 1)[0] and \
                    seen["client_port"] == connection["addr"].rsplit(":", 1)[1]:
                commands.append(seen["command"].split()[0])
    return commands, scrape.text


def test_a_scrape_costs_the_same_with_five_thousand_queued_jobs_and_counts_them_exactly(tmp_path):
    with RedisInstance(tmp_path / "redis") as private, \
            JobsInstance(tmp_path / "jobs", private.url, torchserve_url=nowhere(), lease_seconds=60,
                         concurrency=1) as service:
        first = submit(service, TINY).json()["id"]
        requests.get(service.metrics_url(), timeout=10)  # its connection made
        with_one, text = metrics_commands(private, service)
        assert "\nstyle_jobs_queued 1\n" in text, text

        async def queue_many():
            client = redis.asyncio.Redis.from_url(private.url)
            store = Store(client, client, 60)
            for number in range(5000):
                await store.create(NewJob("default", f"many-{number}", f"default/many-{number}/n/", 1,
                                          "application/json", "print", "image", None, ()), None,
                                   Quotas(10 ** 6, 10 ** 6, 10 ** 12))
            await client.aclose()

        asyncio.run(queue_many())
        with_many, text = metrics_commands(private, service)
        assert "\nstyle_jobs_queued 5001\n" in text and "\nstyle_jobs_running 0\n" in text, text
        requests.post(service.url(f"/jobs/{first}/cancel"), headers=service.auth, timeout=10)
        assert "\nstyle_jobs_queued 5000\n" in requests.get(service.metrics_url(), timeout=10).text
    assert with_one == with_many and len(with_one) <= 3, (with_one, with_many)
    assert {name for name, *_ in METRICS} <= set(re.findall(r"^(style_jobs_\w+) ", text, re.MULTILINE))


def test_metrics_are_only_on_their_port_and_with_a_token_file_need_it(redis_server, tmp_path):
    (tmp_path / "metrics_token").write_text("scraper-token\n")
    with JobsInstance(tmp_path, redis_server.url, torchserve_url=nowhere(),
                      metrics_token_file=tmp_path / "metrics_token") as service:
        assert requests.get(service.url("/metrics"), timeout=5).status_code == 404
        assert requests.get(service.metrics_url(), timeout=5).status_code == 401
        assert requests.get(service.metrics_url(), headers=bearer("scraper-token"), timeout=5).status_code == 200
        assert os.stat(tmp_path / "metrics_token").st_size > 0


# --- the recovery's look-over --------------------------------------------------------------------------------------

RECOVERY_CLIENT = "style-jobs-recovery-under-test"


def pass_commands(private: RedisInstance, one_pass) -> tuple[list[str], list[str]]:
    """What one recovery pass (`one_pass()`) makes Redis run (MONITOR): the commands its connection sent, and
    those the scripts it called ran."""
    (connection,) = [client for client in redis.Redis.from_url(private.url).client_list()
                     if client["name"] == RECOVERY_CLIENT]
    with redis.Redis.from_url(private.url).monitor() as monitor:
        one_pass()
        redis.Redis.from_url(private.url).echo("passed")
        sent, scripted = [], []
        for seen in monitor.listen():
            if seen["command"] == "ECHO passed":
                break
            if f"{seen['client_address']}:{seen['client_port']}" == connection["addr"]:
                sent.append(seen["command"].split()[0])
            elif seen["client_type"] == "lua":
                scripted.append(seen["command"].split()[0])
    return sent, scripted


def test_a_recovery_pass_costs_the_same_with_five_thousand_queued_jobs_and_still_mends_each(tmp_path):
    """One pass of the look-over is one call to Redis with one queued job or 5,000, and the work Redis does for
    it stops growing with the queue; yet with 5,000 a lapsed lease and a dead pick-up at the queue's head are
    mended at the next pass, and a job fallen out of the queue or whose record is gone, anywhere among them,
    within one round of the passes' slices."""
    config = JobsConfig(lease_seconds=15)
    loop = asyncio.new_event_loop()
    with RedisInstance(tmp_path / "redis") as private:
        pool = ArqRedis.from_url(private.url, client_name=RECOVERY_CLIENT)
        filler = ArqRedis.from_url(private.url)
        store, filling = Store(pool, pool, 60), Store(filler, filler, 60)
        queue = QueueWorker(config, pool, runner=None).task_queue
        recovery = Recovery(config, store, pool, queue)

        async def queue_jobs(numbers) -> None:
            for number in numbers:
                await filling.create(NewJob("default", f"many-{number}", f"default/many-{number}/n/", 1,
                                            "application/json", "print", "image", None, ()), None,
                                     Quotas(10 ** 6, 10 ** 6, 10 ** 12))
                await enqueue(filler, job_ref("default", f"many-{number}"))

        def one_pass(cursor: int | None = None):
            recovery.cursor = recovery.cursor if cursor is None else cursor
            return lambda: loop.run_until_complete(recovery.look_over(judge=True))

        loop.run_until_complete(queue_jobs(range(1)))
        one_pass()()  # its connection made, its script loaded
        with_one, _ = pass_commands(private, one_pass())
        loop.run_until_complete(queue_jobs(range(1, 2500)))
        with_half, half_work = pass_commands(private, one_pass(cursor=1000))  # a slice past the queue's head
        loop.run_until_complete(queue_jobs(range(2500, 5000)))
        with_many, many_work = pass_commands(private, one_pass(cursor=1000))
        assert with_one == with_half == with_many == ["EVALSHA"], (with_one, with_many)
        assert Counter(half_work) == Counter(many_work), (Counter(half_work), Counter(many_work))

        ref = lambda number: job_ref("default", f"many-{number}")  # noqa: E731
        store_now = redis.Redis.from_url(private.url)
        # a run that stopped renewing its lease; a pick-up at the head that died before its run began
        assert loop.run_until_complete(store.begin(ref(2500), "lapsed", "gone-replica", 0.05, 60))
        time.sleep(0.1)
        store_now.set(queue.picked_prefix + ref(0), 1, px=queue.picked_ms - 20_000)
        loop.run_until_complete(recovery.look_over(judge=True))
        record = store_now.hgetall(record_key("many-2500"))
        assert record[b"run"] == b"" and json.loads(record[b"retried_after"])["type"] == "LeaseLapsed"
        assert store_now.exists(f"style-jobs:cancel:{ref(2500)}.lapsed"), "its run is stopped in TorchServe"
        assert not store_now.exists(queue.picked_prefix + ref(0)), "arq may take the job again"
        # a job fallen out of the queue, a record gone: found within one round of slices
        store_now.delete(queue.job_prefix + ref(4000))
        store_now.zrem(queue.name, ref(4000))
        store_now.delete(record_key("many-3000"))
        rounds = 0
        while rounds < 2:
            loop.run_until_complete(recovery.look_over(judge=True))
            rounds += recovery.cursor == 0
        assert store_now.exists(queue.job_prefix + ref(4000)) and store_now.zscore(queue.name, ref(4000))
        assert store_now.zscore(ACTIVE, ref(3000)) is None and store_now.zcard(ACTIVE) == 4999
        for client in (pool, filler):
            loop.run_until_complete(client.aclose())
    loop.close()
