"""The handler in-process with a minimal context: initialize + handle, without Java."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from ts.utils.util import PredictionException

from conftest import SAMPLES
from handler_context import make_context, model_dir_with_weights, start_batch
from style_transfer_handler import StyleTransferHandler

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (SAMPLES / "starry_night.jpg").read_bytes()


@pytest.fixture(scope="module")
def served(tmp_path_factory, random_state_dict):
    model_dir = model_dir_with_weights(tmp_path_factory.mktemp("model"), random_state_dict)
    context = make_context(model_dir, {"weights": "random"})
    handler = StyleTransferHandler()
    handler.initialize(context)
    return handler, context


def handle(served, *rows, grpc=False):
    handler, context = served
    start_batch(context, len(rows), grpc)
    return handler.handle(list(rows), context), context


def test_multipart_fields_give_a_png_with_headers(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "64", "steps": "5"})
    image = Image.open(io.BytesIO(body))
    assert (image.format, image.size) == ("PNG", (64, 48))
    assert context.get_response_content_type(0) == "image/png"
    headers = context.get_response_headers(0)
    assert headers["X-Style-Steps"] == "5" and headers["X-Style-Stop-Reason"] == "steps"
    assert float(headers["X-Style-Loss"]) > 0 and float(headers["X-Style-Seconds"]) > 0
    assert headers["X-Style-Weights"].startswith("random")


def test_json_body_and_json_response(served):
    row = {"body": {"content": base64.b64encode(CONTENT).decode(), "style": [base64.b64encode(STYLE).decode()],
                    "params": {"size": 64, "steps": 3, "response": "json", "format": "jpeg"}}}
    (body,), context = handle(served, row)
    fields = json.loads(body)
    assert context.get_response_content_type(0) == "application/json"
    assert (fields["format"], fields["width"], fields["height"], fields["steps"]) == ("jpeg", 64, 48, 3)
    assert set(fields["loss"]) == {"initial", "final"} and fields["loss"]["final"]["total"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(fields["image"]))).format == "JPEG"


def test_a_bad_request_in_a_batch_gets_its_own_400_and_the_others_succeed(served):
    good = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 2}}
    bad = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": "many"}}
    (first, second, third), context = handle(served, good, bad, {"style": STYLE})
    assert Image.open(io.BytesIO(first)).size == (64, 48)
    assert context.get_response_status(1)[0] == 400
    assert json.loads(second) == {"code": 400, "type": "InvalidParameter", "field": "steps",
                                  "message": "steps must be an integer at least 1 and at most 2000; got 'many'"}
    assert context.get_response_status(2)[0] == 400 and json.loads(third)["field"] == "content"


def test_server_maxima_apply(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "1025"})
    assert context.get_response_status(0)[0] == 400
    assert "at most 1024" in json.loads(body)["message"]


def test_a_refused_lone_grpc_request_raises_for_a_grpc_status(served):
    # TorchServe 0.12 ignores per-request statuses on gRPC: only an exception reaches the caller as a status
    with pytest.raises(PredictionException) as error:
        handle(served, {"content": CONTENT, "style": STYLE, "params": b'{"steps": 0}'}, grpc=True)
    assert error.value.error_code == 400 and json.loads(error.value.message)["field"] == "steps"
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "params": b'{"size": 64, "steps": 1}'},
                              grpc=True)
    assert Image.open(io.BytesIO(body)).format == "PNG"
    assert context.get_response_headers(0)["ts_stream_next"] == "false"  # see the handler: gRPC streams need it


def test_requests_of_the_same_size_and_settings_share_a_batch_as_far_as_memory_allows(served):
    from style_engine.memory import peak_bytes, workload
    from style_transfer_handler import _batches

    handler, _ = served
    row = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 2}}
    prepared = {i: handler._prepare(dict(row), grpc=False) for i in range(5)}
    prepared[5] = handler._prepare({**row, "params": {"size": 96, "steps": 2}}, grpc=False)
    prepared[6] = handler._prepare({**row, "params": {"size": 64, "steps": 3}}, grpc=False)
    cpu = torch.device("cpu")
    two_fit = peak_bytes(workload([prepared[0][0]] * 2, cpu))

    def within(budget):
        return lambda jobs: peak_bytes(workload(jobs, cpu)) <= budget

    assert sorted(_batches(prepared, within(10 * two_fit))) == [[0, 1, 2, 3, 4], [5], [6]]
    assert sorted(_batches(prepared, within(two_fit))) == [[0, 1], [2, 3], [4], [5], [6]]


def test_a_batch_answers_each_request_as_if_alone(served):
    """The default optimiser (L-BFGS) in a batch of two: each request keeps its own curvature history, step
    size and stopping, so each answer is what it would be alone, but for the convolutions' summation order
    (tests/test_optimize.py: batched results)."""
    lbfgs = {"size": 64, "steps": 3, "precision": "fp32"}
    rows = [{"content": CONTENT, "style": STYLE, "params": {**lbfgs, "init": "noise", "seed": seed}} for seed in (1, 2)]
    together, context = handle(served, *rows)
    together_losses = [float(context.get_response_headers(i)["X-Style-Loss"]) for i in range(2)]
    for index, row in enumerate(rows):
        (alone,), alone_context = handle(served, row)
        pixels_together, pixels_alone = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
                                         for data in (together[index], alone))
        assert np.abs(pixels_together - pixels_alone).max() <= 1  # one level of 255: rounding
        assert float(alone_context.get_response_headers(0)["X-Style-Loss"]) == pytest.approx(
            together_losses[index], rel=1e-3)
    assert together[0] != together[1]


def test_every_request_leaves_one_log_line_without_image_data(served, caplog):
    good = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 2, "precision": "fp32"}}
    bad = {"content": CONTENT, "style": STYLE, "params": {"steps": 0}}
    with caplog.at_level("INFO", logger="style_transfer_handler"):
        _, context = handle(served, good, bad)
    lines = [record.getMessage() for record in caplog.records if "style_transfer request" in record.getMessage()]
    records = [json.loads(line.split("style_transfer request ", 1)[1]) for line in lines]
    assert len(records) == 2 and all(len(line) < 400 for line in lines)
    served_record, refused_record = sorted(records, key=lambda record: record["status"])
    assert served_record == {"request_id": context.request_ids[0], "status": 200, "size": "64x48", "styles": 1,
                             "batch": 1, "checkpoint": False, "steps": 2, "precision": "fp32",
                             "seconds": served_record["seconds"], "stop_reason": "steps"}
    assert refused_record == {"request_id": context.request_ids[1], "status": 400, "error": "InvalidParameter",
                              "field": "steps"}


def test_a_style_scale_past_the_style_pixel_limit_is_refused(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "1024", "style_scale": "4"})
    assert context.get_response_status(0)[0] == 413
    error = json.loads(body)
    assert error["field"] == "style_scale" and "style_scale at most" in error["message"]
