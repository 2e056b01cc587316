"""scripts/local_cluster.py: two real TorchServe instances behind a real nginx lose no request when one dies, and
refuse an overload fast without computing a job twice."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from local_cluster import Hop, find_nginx, render_nginx_conf

pytestmark = pytest.mark.integration

REQUESTS = 40


@pytest.fixture(scope="module")
def nginx_binary():
    try:
        return find_nginx()
    except SystemExit as missing:  # a failure, not a skip: scripts/test.sh installs nginx
        pytest.fail(str(missing))


def test_nginx_accepts_the_rendered_template(nginx_binary, tmp_path):
    hops = [Hop(f"instance-{i}", 20000 + i, f"127.0.0.1:{21000 + i}", f"key{i}") for i in (1, 2)]
    for folder in ("logs", "temp"):
        (tmp_path / folder).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(tmp_path, 20000, "0" * 64, hops))
    check = subprocess.run([nginx_binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "err.log")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_no_request_fails_when_an_instance_is_killed_mid_run(nginx_binary, model_store, tmp_path):
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "--instances", "2",
         "--model-store", str(model_store), "--requests", str(REQUESTS), "--concurrency", "4", "--size", "64",
         "--steps", "5", "--report", str(report_file),
         "--load-timeout", "120"],
        capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_file.read_text())
    assert report["auth"] == {"ping_without_token": 200, "predict_without_token": 401, "predict_with_wrong_token": 401,
                              "describe_with_token": 200, "describe_without_token": 401, "rescale_with_token": 405,
                              "list_models_with_token": 404}
    assert report["requests"] == {"sent": REQUESTS, "succeeded": REQUESTS, "failed": 0}
    assert report["killed"]["instance"] == "instance-2" and report["killed"]["after_responses"] < REQUESTS
    assert all(report["served_by"]["before_kill"].get(name, 0) > 0 for name in ("instance-1", "instance-2"))
    assert report["served_by"]["after_kill"].get("instance-1", 0) > 0
    assert report["retried_by_nginx"] >= 1  # what was sent to the dead instance was served by the other
    latency = report["latency_seconds"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    for group in report["process_groups"]:  # TorchServe launchers with Java and workers, and nginx
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    assert not os.path.exists(report["workdir"])


def test_an_overload_is_refused_fast_and_no_job_is_computed_twice(nginx_binary, model_store, tmp_path):
    """More requests at once than two instances can queue (job_queue_size 1 each), each instance's worker first
    kept busy for 3 s by a request sent past nginx, so that the queues are full whatever the host's speed:
    every request gets its image or, at once, 503 with Retry-After from the front (which does not pass a busy
    instance's 503 on to another instance as a new job), and the instances answered exactly the images the
    clients got and the occupying requests."""
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "--overload", "--queue-size", "1",
         "--instances", "2", "--occupy", "3", "--model-store", str(model_store), "--requests", "16",
         "--concurrency", "8", "--size", "32", "--steps", "10", "--report", str(report_file),
         "--load-timeout", "120"],
        capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(report_file.read_text())["overload"]
    assert set(figures["statuses"]) == {"200", "503"}, figures
    assert figures["refused_without_retry_after"] == 0 and figures["refused_max_seconds"] <= 5
    assert figures["answered_by_instances"] == figures["statuses"]["200"] + 2  # + the occupying requests


@pytest.fixture(scope="module")
def short_margin_store(tmp_path_factory):
    """The archive with a reply margin of 1 s, so that a client that waits 4 s leaves 3 s for work."""
    from build_mar import build

    handler = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
    store = tmp_path_factory.mktemp("short_margin_store")
    build("random", store, settings={"handler": {**handler, "reply_margin_seconds": 1}})
    return store


def test_requests_that_outwait_their_client_are_dropped_before_any_work(nginx_binary, short_margin_store, tmp_path):
    """nginx waits 4 s for an answer and says so to the handler; the one worker is first kept busy for 6 s by a
    request sent past nginx. The first 4 requests through nginx wait in the queue past their clients' 4 s:
    each client gets nginx's 504, and the handler drops each request before any work (StyleRefusals with
    Reason="expired", once per 504); the next ones, queued behind them, get their images in the time their
    clients still wait. The instance computed no image but the occupying one and the clients' 200s."""
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "--overload", "--queue-size", "8",
         "--instances", "1", "--client-timeout", "4", "--occupy", "6", "--model-store", str(short_margin_store),
         "--requests", "12", "--concurrency", "4", "--size", "32", "--steps", "5", "--report", str(report_file),
         "--load-timeout", "60"],
        capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(report_file.read_text())["overload"]
    assert figures["statuses"].get("504", 0) == 4 and figures["statuses"].get("200", 0) >= 4, figures
    assert figures["expired_by_instances"] == figures["statuses"]["504"]
    assert figures["answered_by_instances"] == figures["statuses"]["200"] + 1  # + the occupying request


def test_the_front_retries_only_where_no_instance_computes_the_request():
    """No retry on a timeout (the instance may still be computing) nor on a 503 (answered at once)."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    (directive,) = [line.split()[1:] for line in conf.splitlines() if line.strip().startswith("proxy_next_upstream ")]
    assert [word.rstrip(";") for word in directive] == ["error", "http_502", "non_idempotent"]
