"""Streaming over HTTP, gRPC Predictions and StreamPredictions, and the client against a real TorchServe."""

import json
import subprocess
import sys

import grpc
import inference_pb2
import inference_pb2_grpc
import pytest
import requests
from PIL import Image

from conftest import ROOT, SAMPLES, STYLES

pytestmark = pytest.mark.integration

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
SEEDED = {"size": 64, "steps": 8, "init": "noise", "seed": 5}


def rest(server, params, **kwargs):
    return requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                         files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(params)},
                         timeout=120, **kwargs)


def grpc_request(params):
    return inference_pb2.PredictionsRequest(model_name="style_transfer", input={
        "content": CONTENT, "style": STYLE, "params": json.dumps(params).encode()})


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield inference_pb2_grpc.InferenceAPIsServiceStub(channel)


def metadata(server):
    return (("authorization", f"Bearer {server.key()}"),)


def test_http_streaming_sends_progress_then_the_image(server):
    # float32: progress losses are then the same precision as the final, reported one. A time budget rather
    # than a number of steps: progress comes every 0.5 s, so 2.5 s give at least 3 events on any machine.
    response = rest(server, {"size": 64, "steps": 2000, "max_seconds": 2.5, "early_stop_tol": 0, "stream": True,
                             "preview": True, "precision": "fp32"},
                    stream=True)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    events = [json.loads(line) for line in response.iter_lines() if line]
    progress, done = events[:-1], events[-1]
    assert len(progress) >= 3 and all(e["event"] == "progress" for e in progress)
    steps = [e["step"] for e in progress]
    losses = [e["loss"]["total"] for e in progress]
    assert steps == sorted(set(steps)) and all(s <= 2000 for s in steps)
    assert all(b <= a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    assert "preview" in progress[0]  # the first preview goes with the first progress event
    assert done["event"] == "done" and (done["width"], done["height"]) == (64, 48)
    assert done["steps"] >= steps[-1] and done["stop_reason"] == "max_seconds"
    assert done["loss"]["final"]["total"] <= losses[-1]
    same_start = rest(server, {"size": 64, "steps": 1, "response": "json"}).json()
    assert same_start["loss"]["initial"] == done["loss"]["initial"]


def test_grpc_predictions_and_stream_predictions_return_the_rest_image(server, stub):
    over_rest = rest(server, SEEDED)
    assert over_rest.status_code == 200
    unary = stub.Predictions(grpc_request(SEEDED), metadata=metadata(server), timeout=120)
    streamed = list(stub.StreamPredictions(grpc_request(SEEDED), metadata=metadata(server), timeout=120))
    assert unary.prediction == over_rest.content
    assert [reply.prediction for reply in streamed] == [over_rest.content]


def test_grpc_errors_carry_the_same_message_as_rest(server, stub):
    bad = {"size": 64, "pooling": "median"}
    rest_error = rest(server, bad).json()
    for call in (stub.Predictions, lambda *a, **k: list(stub.StreamPredictions(*a, **k))):
        with pytest.raises(grpc.RpcError) as error:
            call(grpc_request(bad), metadata=metadata(server), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert json.loads(error.value.details().split("\n")[0]) == rest_error
    assert rest_error["field"] == "pooling"


def test_grpc_needs_the_token(server, stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Predictions(grpc_request(SEEDED), timeout=60)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_stream_param_is_refused_without_harming_the_worker(server, stub):
    workers = server.worker_pids()
    with pytest.raises(grpc.RpcError) as error:
        stub.Predictions(grpc_request({**SEEDED, "stream": True}), metadata=metadata(server), timeout=60)
    assert json.loads(error.value.details().split("\n")[0])["field"] == "stream"
    assert server.worker_pids() == workers


def run_client(server, tmp_path, *options):
    command = [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(SAMPLES / "tubingen.jpg"),
               str(STYLES / "starry_night.jpg"), "-o", str(tmp_path / "out.png"),
               "--key-file", str(server.workdir / "key_file.json"), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("transport", ["url", "grpc"])
def test_client_writes_the_image(server, tmp_path, transport):
    address = server.url("inference") if transport == "url" else server.grpc_target
    run = run_client(server, tmp_path, f"--{transport}", address, "--set", "size=64", "--set", "steps=5", "--json")
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 48)
    assert json.loads(run.stdout)["steps"] == 5


@pytest.mark.parametrize("transport", ["url", "grpc"])
def test_client_prints_the_servers_error_and_fails(server, tmp_path, transport):
    address = server.url("inference") if transport == "url" else server.grpc_target
    run = run_client(server, tmp_path, f"--{transport}", address, "--set", "steps=0")
    assert run.returncode == 1 and not (tmp_path / "out.png").exists()
    error = json.loads(run.stderr.strip().splitlines()[-1])
    assert error["field"] == "steps" and error["message"].startswith("steps must be an integer at least 1")
