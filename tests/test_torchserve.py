"""The archive in a real TorchServe (Java), over real HTTP."""

import base64
import io
import json
import os
import re
import time

import pytest
import requests
from PIL import Image

from conftest import SAMPLES, STYLES, sample
from style_engine.codec import decode_image
from style_engine.resize import resize
from torchserve_instance import TorchServeInstance

pytestmark = pytest.mark.integration

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()


def predict(server, *, headers=None, **kwargs):
    return requests.post(server.url("inference", "/predictions/style_transfer"),
                         headers=server.auth() if headers is None else headers, timeout=120, **kwargs)


def assert_stylised_png(body: bytes):
    image = Image.open(io.BytesIO(body))
    assert (image.format, image.size) == ("PNG", (64, 48))
    pixels = decode_image(body, "result", max_pixels=10**6)
    assert (pixels - resize(sample("tubingen.jpg"), (48, 64))).abs().mean() > 0.01  # not the content


def test_multipart_request(server):
    response = predict(server, files={"content": CONTENT, "style": STYLE}, data={"size": "64", "steps": "10"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Style-Steps"] == "10"
    assert response.headers["X-Style-Weights"].startswith("random")
    assert_stylised_png(response.content)


def test_plain_form_fields_spell_null_as_json_does(server):
    """openapi.yaml allows null for lr and max_seconds as form fields too; Schemathesis sends it as "null"."""
    response = predict(server, files={"content": CONTENT, "style": STYLE},
                       data={"size": "64", "steps": "2", "lr": "null", "max_seconds": "null"})
    assert response.status_code == 200, response.text


def test_json_body(server):
    body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(),
            "params": {"size": 64, "steps": 10}}
    response = predict(server, json=body)
    assert response.status_code == 200, response.text
    assert_stylised_png(response.content)


def test_json_response(server):
    response = predict(server, files={"content": CONTENT, "style": STYLE},
                       data={"params": json.dumps({"size": 64, "steps": 10, "response": "json"})})
    assert response.status_code == 200, response.text
    fields = response.json()
    assert {"image", "format", "width", "height", "steps", "seconds", "loss"} <= set(fields)
    assert (fields["width"], fields["height"], fields["steps"]) == (64, 48, 10)
    assert fields["loss"]["final"]["total"] < fields["loss"]["initial"]["total"]
    assert_stylised_png(base64.b64decode(fields["image"]))


def test_bad_parameter_is_a_400_json_error(server):
    response = predict(server, files={"content": CONTENT, "style": STYLE}, data={"size": "huge"})
    assert response.status_code == 400
    assert response.json() == {"code": 400, "type": "InvalidParameter", "field": "size",
                               "message": "size must be an integer at least 32 and at most 1024; got 'huge'"}


def test_token_is_required(server):
    files = {"content": CONTENT, "style": STYLE}
    refused = predict(server, headers={}, files=files, data={"size": "64", "steps": "1"})
    assert refused.status_code in (400, 401) and "Token Authorization failed" in refused.text
    wrong = predict(server, headers={"Authorization": "Bearer wrong"}, files=files, data={"size": "64"})
    assert wrong.status_code in (400, 401)
    assert predict(server, files=files, data={"size": "64", "steps": "1"}).status_code == 200


def test_management_api_describes_the_model(server):
    response = requests.get(server.url("management", "/models/style_transfer"), headers=server.auth("management"),
                            timeout=10)
    assert response.status_code == 200
    (model,) = response.json()
    assert model["modelName"] == "style_transfer" and model["batchSize"] == 8
    assert model["responseTimeout"] == 300 and model["workers"][0]["status"] == "READY"
    assert requests.get(server.url("management", "/models"), timeout=10).status_code in (400, 401)


def test_custom_metrics_reach_the_prometheus_endpoint(server):
    # early_stop_tol 0.9 over 1 step makes the optimisation stop as converged at once: an early stop
    response = predict(server, files={"content": CONTENT, "style": STYLE},
                       data={"size": "64", "steps": "20", "early_stop_tol": "0.9", "early_stop_window": "1"})
    assert response.status_code == 200 and response.headers["X-Style-Stop-Reason"] == "converged"
    metrics = requests.get(server.url("metrics", "/metrics"), timeout=10).text
    for name in ("StyleOptimizationSeconds", "StyleSteps", "StyleStepsPerSecond", "StyleFinalLoss"):
        assert f'{name}{{ModelName="style_transfer",Level="Model"' in metrics, name
    assert 'StyleEarlyStops{ModelName="style_transfer",Level="Model",StopReason="converged"' in metrics
    assert "ts_inference_requests_total" in metrics  # TorchServe's own metrics stay


def test_without_a_configured_worker_count_each_visible_gpu_gets_a_worker_and_stopping_leaves_no_process(
        model_store, tmp_path):
    """As in the container (deploy/config.properties): no default_workers_per_model, so TorchServe starts one
    worker per GPU it sees, each given its own device. TorchServe counts GPUs from CUDA_VISIBLE_DEVICES where it
    is set; here there is no GPU behind the ids, so each worker runs on the CPU, but is told its own id. Stopped,
    the instance leaves no process behind: not its launcher's group, not Java, not either worker."""
    with TorchServeInstance(model_store, tmp_path, overrides={"default_workers_per_model": "0"},
                            env={"CUDA_VISIBLE_DEVICES": "0,1"}) as instance:
        deadline = time.monotonic() + 120
        while len(instance.worker_pids(quiet=True)) < 2:
            assert time.monotonic() < deadline, instance.log_tail()
            time.sleep(0.5)
        group = instance.process.pid
        pids = [group, *instance.worker_pids()]
    log = (tmp_path / "logs" / "model_log.log").read_text()
    told = sorted(set(re.findall(r"TorchServe's gpu_id: (\d+)", log)))
    assert told == ["0", "1"]
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
