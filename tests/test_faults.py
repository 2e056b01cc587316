"""Faults and load on a real TorchServe: a worker SIGKILLed mid-request, a full job queue, more clients than
workers, requests that run out of their time budget or ask for none, a batch whose groups together would
outlast responseTimeout, and a device that fails for good."""

import io
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import torch
import yaml
from PIL import Image

from conftest import ROOT, SAMPLES, STYLES
from faulty_device_handler import FAULT_SEED
from jobs_calls import until

pytestmark = pytest.mark.integration

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
SHORT = {"size": 64, "steps": 2}
LONG = {"size": 64, "steps": 2000, "early_stop_tol": 0}  # runs until max_seconds stops it
RESPONSE_TIMEOUT = 300  # s, handler/model-config.yaml: what a client would wait for a hung worker


# An archive whose limits make hours minutes: TorchServe gives up on a worker after 12 s, one call of the
# handler may optimise for 6 s, and requests wait up to 1.5 s to be batched together. Its entry point is the
# real handler on a device that can be made to fail (tests/support/faulty_device_handler.py).
LIMITED = {"responseTimeout": 12, "maxBatchDelay": 1500,
           "handler": {**yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"],
                       "reply_margin_seconds": 6, "defaults": {"size": 256, "steps": 200, "max_seconds": 5},
                       "maxima": {"size": 1024, "steps": 2000, "max_seconds": 6}}}
LIMITED_CALL_SECONDS = 6


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    from build_mar import build
    from torchserve_instance import TorchServeInstance

    store = tmp_path_factory.mktemp("limited_store")
    build("random", store, handler=ROOT / "tests" / "support" / "faulty_device_handler.py", settings=LIMITED)
    with TorchServeInstance(store, tmp_path_factory.mktemp("limited_torchserve")) as instance:
        yield instance


def predict(instance, params: dict, **kwargs) -> tuple[requests.Response, float]:
    """The response and the monotonic time it arrived."""
    response = requests.post(instance.url("inference", "/predictions/style_transfer"), headers=instance.auth(),
                             files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(params)},
                             timeout=120, **kwargs)
    return response, time.monotonic()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def start_long_request(pool, instance, pid: int, max_seconds: float, timeout: float = 30):
    """A long request submitted to `pool`, returned once worker `pid` is optimising it: when it has used 0.5 s
    of CPU more than before (an idle worker uses next to none)."""
    since = cpu_seconds(pid)
    pending = pool.submit(predict, instance, {**LONG, "max_seconds": max_seconds})
    deadline = time.monotonic() + timeout
    while cpu_seconds(pid) - since < 0.5:
        assert time.monotonic() < deadline, "the worker never started on the request"
        time.sleep(0.05)
    return pending


def ready_worker(instance, not_pid: int | None = None, timeout: float = 120) -> int:
    """The pid of the model's one READY worker (other than `not_pid`), waiting for TorchServe to start it."""
    deadline = time.monotonic() + timeout
    while True:
        pids = instance.worker_pids(quiet=True)
        if len(pids) == 1 and pids[0] != not_pid:
            return pids[0]
        assert time.monotonic() < deadline, f"no new READY worker after {timeout} s:\n{instance.log_tail()}"
        time.sleep(0.2)


def assert_png(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (64, 48)


def test_a_worker_killed_mid_request_fails_that_request_at_once_and_is_replaced(breakable_server):
    pid = ready_worker(breakable_server)
    with ThreadPoolExecutor(1) as pool:
        pending = start_long_request(pool, breakable_server, pid, max_seconds=60)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        response, arrived_at = pending.result(timeout=60)
    assert arrived_at - killed_at < 10, f"the client waited {arrived_at - killed_at:.1f} s, not {RESPONSE_TIMEOUT}"
    assert response.status_code == 507  # TorchServe's status for a worker that died
    assert response.json() == {"code": 507, "type": "InternalServerException", "message": "Worker died."}
    new_pid = ready_worker(breakable_server, not_pid=pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for _ in range(2):
        assert_png(predict(breakable_server, SHORT)[0])
    assert breakable_server.worker_pids() == [new_pid]


def test_a_full_job_queue_answers_503_at_once(breakable_server):
    # One request runs for 5 s; of five more sent meanwhile, the queue (job_queue_size=2) takes two and
    # TorchServe refuses the other three at once, whichever arrive first.
    pid = ready_worker(breakable_server)
    with ThreadPoolExecutor(6) as pool:
        running = start_long_request(pool, breakable_server, pid, max_seconds=5)
        sent_at = time.monotonic()
        others = [pool.submit(predict, breakable_server, SHORT) for _ in range(5)]
        results = [future.result(timeout=120) for future in others]
        first, _ = running.result(timeout=120)
    assert sorted(response.status_code for response, _ in results) == [200, 200, 503, 503, 503]
    refused = [(response, arrived_at) for response, arrived_at in results if response.status_code == 503]
    assert all(arrived_at - sent_at < 3 for _, arrived_at in refused), "503 at once, not after the queue drains"
    assert refused[0][0].json()["type"] == "ServiceUnavailableException"
    assert first.status_code == 200 and first.headers["X-Style-Stop-Reason"] == "max_seconds"
    for response, _ in results:
        if response.status_code == 200:
            assert_png(response)
    assert breakable_server.worker_pids() == [pid]


def test_eight_concurrent_clients_on_one_worker_are_all_served(server):
    (pid,) = server.worker_pids()

    def client(number: int) -> list[requests.Response]:
        return [predict(server, {**SHORT, "seed": number})[0] for _ in range(2)]

    with ThreadPoolExecutor(8) as pool:
        responses = [response for pair in pool.map(client, range(8)) for response in pair]
    assert len(responses) == 16
    for response in responses:
        assert_png(response)
        assert response.headers["X-Style-Steps"] == "2"
    assert server.worker_pids() == [pid]


def test_a_request_over_its_time_budget_returns_its_best_image(server):
    started = time.monotonic()
    response, arrived_at = predict(server, {**LONG, "max_seconds": 1})
    assert_png(response)
    assert response.headers["X-Style-Stop-Reason"] == "max_seconds"
    assert int(response.headers["X-Style-Steps"]) < 2000
    assert 1.0 <= float(response.headers["X-Style-Seconds"]) < 5.0
    assert arrived_at - started < 30


def test_the_largest_time_budget_ends_well_before_response_timeout(server):
    # A request at the max_seconds cap returns its image before TorchServe would give up on the worker
    model = requests.get(server.url("management", "/models/style_transfer"), headers=server.auth("management"),
                         timeout=10).json()[0]
    cap = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]["maxima"]["max_seconds"]
    assert model["responseTimeout"] == RESPONSE_TIMEOUT and RESPONSE_TIMEOUT - cap >= 30


def test_a_null_time_budget_is_held_to_the_servers_cap(limited_server):
    """null asks for no budget of the request's own: the server's cap (6 s here) still ends it, with its best
    image, long before TorchServe would restart the worker (12 s)."""
    (pid,) = limited_server.worker_pids()
    started = time.monotonic()
    response, arrived_at = predict(limited_server, {**LONG, "max_seconds": None})
    assert response.status_code == 200, response.text
    assert response.headers["X-Style-Stop-Reason"] == "max_seconds"
    assert float(response.headers["X-Style-Seconds"]) <= LIMITED_CALL_SECONDS + 2  # + the last iteration
    assert arrived_at - started < LIMITED["responseTimeout"]
    assert limited_server.worker_pids() == [pid]


def test_groups_of_one_batch_share_one_deadline(limited_server):
    """Two requests of different sizes arrive in one batch but cannot share a pass through VGG19: the handler
    optimises them one after the other. Each may use 6 s on its own, together they must still answer within
    responseTimeout, or TorchServe restarts the worker and both are lost."""
    (pid,) = limited_server.worker_pids()
    sizes = (64, 80)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(predict, limited_server, {**LONG, "size": size, "max_seconds": None})
                   for size in sizes]
        results = [future.result(timeout=120) for future in pending]
    for (response, arrived_at), size in zip(results, sizes):
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size[0] == size
        assert arrived_at - started < LIMITED["responseTimeout"]
    (first, first_at), (second, second_at) = results
    assert abs(first_at - second_at) < 1, "both in one batch: TorchServe answers a batch together"
    engine_seconds = sum(float(response.headers["X-Style-Seconds"]) for response, _ in results)
    assert engine_seconds <= LIMITED_CALL_SECONDS + 2
    assert limited_server.worker_pids() == [pid]


# At the CPU's maxima (handler/model-config.yaml, device_overrides.cpu): size 1024, 4 styles, style_scale up to
# max_style_pixels (1.6 for these paintings at size 1024), no time budget of their own; and smaller ones.
PRESETS = "shipwreck,starry_night,woman-with-hat-matisse"
AT_THE_EDGES = [{"size": 1024, "presets": PRESETS, "style_scale": 1.6}, {"size": 1024},
                {"size": 512, "presets": PRESETS, "style_scale": 1.6}, {"size": 256, "style_scale": 1.6},
                {"size": 128, "presets": "shipwreck"}]


def test_a_batch_at_the_maxima_is_answered_within_response_timeout_and_the_worker_stays(limited_server):
    """Requests at the largest size, style count and style_scale the server admits, sent together, arrive in one
    batch: each is served, refused before any work (413: its work that no time budget interrupts could not
    fit the server's maximum even alone) or sent back to retry (503 with Retry-After: the call had no time
    left for it); all within responseTimeout, and the worker is the same process."""
    (pid,) = limited_server.worker_pids()
    started = time.monotonic()
    with ThreadPoolExecutor(len(AT_THE_EDGES)) as pool:
        pending = [pool.submit(predict, limited_server, {**LONG, "max_seconds": None, "precision": "fp32", **edge})
                   for edge in AT_THE_EDGES]
        results = [future.result(timeout=120) for future in pending]
    for (response, arrived_at), edge in zip(results, AT_THE_EDGES):
        assert arrived_at - started < LIMITED["responseTimeout"], (edge, response.status_code)
        assert response.status_code in (200, 413, 503), (edge, response.text)
        if response.status_code == 413:
            assert response.json()["field"] == "size" and "fits" in response.json()["message"]
        if response.status_code == 503:
            assert response.json()["type"] == "Busy" and int(response.headers["Retry-After"]) >= 1
    statuses = [response.status_code for response, _ in results]
    assert statuses[-1] == 200, statuses  # the cheapest goes first
    assert limited_server.worker_pids() == [pid]


def test_a_device_that_fails_for_good_ends_its_worker_after_answering(limited_server):
    """A failure that leaves the device unusable (on a GPU: a poisoned CUDA context) is answered, then the
    worker ends so that TorchServe starts a fresh one, which serves the next request. The streamed request it
    hit had begun: its status stays 200 and its last line is the error."""
    (pid,) = limited_server.worker_pids()
    response, _ = predict(limited_server, {"size": 64, "steps": 50, "early_stop_tol": 0, "seed": FAULT_SEED,
                                           "stream": True, "precision": "fp32"}, stream=True)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/x-ndjson"
    events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[0]["event"] == "progress"
    assert events[-1] == {"event": "error", "code": 503, "type": "DeviceFailure", "field": None,
                          "message": events[-1]["message"]}
    new_pid = ready_worker(limited_server, not_pid=pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert_png(predict(limited_server, SHORT)[0])
    assert limited_server.worker_pids() == [new_pid]


# A response size limit that a 1024 px answer exceeds and the 256 px ones of the memory tests fit.
SMALL_RESPONSES = 1_000_000


def memory_server(tmp_path_factory, name: str, save_memory: bool, budget: int):
    """A private TorchServe whose worker has `budget` bytes for requests, with or without the memory-saving
    path, and TorchServe's max_response_size lowered to SMALL_RESPONSES (the handler told the same)."""
    from build_mar import build
    from torchserve_instance import TorchServeInstance

    handler = {**yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"],
               "memory_budget_bytes": budget, "save_memory": save_memory, "max_response_size": SMALL_RESPONSES}
    store = tmp_path_factory.mktemp(f"{name}_store")
    build("random", store, settings={"handler": handler})
    return TorchServeInstance(store, tmp_path_factory.mktemp(name),
                              overrides={"max_response_size": str(SMALL_RESPONSES)})


# Single scale, two iterations: 256 px needs more than the budget as it is, less with checkpointing.
LARGE = {"size": 256, "min_scale": 256, "steps": 2, "precision": "fp32"}


def large_request_budget() -> int:
    from style_engine import StyleJob, parse_params
    from style_engine.codec import decode_image
    from style_engine.memory import Passes, peak_bytes, workload
    from style_engine.targets import shrink_to_need

    job = shrink_to_need(StyleJob(decode_image(CONTENT, "content", max_pixels=10**8),
                                  (decode_image(STYLE, "style", max_pixels=10**8),), parse_params(LARGE)[0]))
    plain, checkpointed = (peak_bytes(workload([job], torch.device("cpu"), Passes(c))) for c in (False, True))
    return (plain + checkpointed) // 2


def test_a_request_over_the_memory_budget_is_refused_at_once_and_a_smaller_one_served(tmp_path_factory):
    with memory_server(tmp_path_factory, "tight_memory", save_memory=False, budget=large_request_budget()) as server:
        (pid,) = server.worker_pids()
        started = time.monotonic()
        refused, refused_at = predict(server, LARGE)
        assert refused.status_code == 413 and refused_at - started < 5, "refused before any work"
        error = refused.json()
        assert (error["type"], error["field"]) == ("TooLarge", "size")
        largest = int(re.search(r"size at most (\d+) fits", error["message"]).group(1))
        assert LARGE["size"] // 2 <= largest < LARGE["size"]
        served, _ = predict(server, {**LARGE, "size": largest})
        assert served.status_code == 200, served.text
        assert server.worker_pids() == [pid]
        metrics = requests.get(server.url("metrics", "/metrics"), timeout=10).text
        assert re.search(r'StyleRefusals\{[^}]*Reason="memory"[^}]*\} 1\.0', metrics)
        # An answer larger than max_response_size would make TorchServe drop the worker: refused before any work
        started = time.monotonic()
        refused, refused_at = predict(server, {"size": 1024, "init": "noise", "steps": 1, "response": "json"})
        assert refused.status_code == 413 and refused_at - started < 5, refused.text
        error = refused.json()
        assert error["field"] == "size" and f"max_response_size of {SMALL_RESPONSES} bytes" in error["message"]
        assert server.worker_pids() == [pid]


def test_with_the_memory_saving_path_the_same_request_is_served(tmp_path_factory):
    with memory_server(tmp_path_factory, "saving_memory", save_memory=True, budget=large_request_budget()) as server:
        response, _ = predict(server, LARGE)
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (256, 192)
        # the worker's output reaches model_log.log through Java, after the answer it follows may have
        until(lambda: logged(server, '"size": "256x192"', '"checkpoint": true'), server, timeout=10)


def logged(server, *parts: str) -> bool:
    """Whether a line of the worker's log holds all `parts`."""
    lines = (server.workdir / "logs" / "model_log.log").read_text().splitlines()
    return any(all(part in line for part in parts) for line in lines)
