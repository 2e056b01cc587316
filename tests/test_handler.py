"""The handler in-process with a minimal context: initialize + handle, without Java."""

import base64
import io
import json
import math

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from ts.utils.util import PredictionException

from cancellation import CANCEL_KEY_PREFIX, CancelSignals
from conftest import SAMPLES, STYLES
from handler_context import start_batch
from style_transfer_handler import StyleTransferHandler

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()


def handle(served, *rows, grpc=False, describe=()):
    handler, context = served
    start_batch(context, len(rows), grpc, describe)
    return handler.handle(list(rows), context), context


def handler_of(served) -> StyleTransferHandler:
    return served[0]


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(white_from: float = 0.0) -> bytes:
    """An 8x6 mask, white from the fraction `white_from` of its width to the right edge."""
    image = Image.new("L", (8, 6), 0)
    image.paste(255, (round(8 * white_from), 0, 8, 6))
    return png_of(image)


def test_the_handler_module_defines_one_class_as_torchserve_needs():
    # TorchServe 0.12's model loader takes a module's one class as the entry point and refuses a module with more
    import inspect

    import style_transfer_handler

    assert [name for name, value in inspect.getmembers(style_transfer_handler, inspect.isclass)
            if value.__module__ == style_transfer_handler.__name__] == ["StyleTransferHandler"]


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


def test_style_1_is_refused_rather_than_taken_for_style(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "style_1": STYLE, "size": "64"})
    assert context.get_response_status(0)[0] == 400
    assert json.loads(body)["field"] == "style_1" and "the first style image is the part style" in json.loads(body)[
        "message"]


def test_server_maxima_apply(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "2049"})
    assert context.get_response_status(0)[0] == 400
    assert "at most 1024" in json.loads(body)["message"]


def test_a_size_only_a_job_may_ask_is_a_413_that_names_the_jobs_api(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "1025"})
    assert context.get_response_status(0)[0] == 413
    error = json.loads(body)
    assert error["field"] == "size" and "at most 1024" in error["message"] and "POST /jobs" in error["message"]


def test_a_refused_lone_grpc_request_raises_for_a_grpc_status(served):
    # TorchServe 0.12 ignores per-request statuses on gRPC: only an exception reaches the caller as a status
    with pytest.raises(PredictionException) as error:
        handle(served, {"content": CONTENT, "style": STYLE, "params": b'{"steps": 0}'}, grpc=True)
    assert error.value.error_code == 400 and json.loads(error.value.message)["field"] == "steps"
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "params": b'{"size": 64, "steps": 1}'},
                              grpc=True)
    assert Image.open(io.BytesIO(body)).format == "PNG"
    assert context.get_response_headers(0)["ts_stream_next"] == "false"  # see the handler: gRPC streams need it


def grouped(preparation, prepared: dict, memory_budget: int, monkeypatch) -> list[tuple[int, ...]]:
    """The requests the handler would optimise together, with `memory_budget` bytes for requests."""
    monkeypatch.setattr(preparation, "memory_budget", memory_budget)
    return sorted(group.requests for group in preparation.groups(prepared))


def test_requests_of_the_same_size_and_settings_share_a_batch_as_far_as_memory_allows(served, monkeypatch):
    from style_engine.memory import peak_bytes, workload

    preparation = handler_of(served).preparation
    row = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 2}}
    prepared = {i: preparation.prepare(dict(row), grpc=False) for i in range(5)}
    # another size, smaller: alone it fits the budget below in any precision (a larger one may not, in bf16)
    prepared[5] = preparation.prepare({**row, "params": {"size": 48, "steps": 2}}, grpc=False)
    prepared[6] = preparation.prepare({**row, "params": {"size": 64, "steps": 3}}, grpc=False)
    two_fit = peak_bytes(workload([prepared[0].job] * 2, torch.device("cpu")))
    assert grouped(preparation, prepared, 10 * two_fit, monkeypatch) == [(0, 1, 2, 3, 4), (5,), (6,)]
    assert grouped(preparation, prepared, two_fit, monkeypatch) == [(0, 1), (2, 3), (4,), (5,), (6,)]


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
    with caplog.at_level("INFO", logger="telemetry"):
        _, context = handle(served, good, bad)
    lines = [record.getMessage() for record in caplog.records if "style_transfer request" in record.getMessage()]
    records = [json.loads(line.split("style_transfer request ", 1)[1]) for line in lines]
    assert len(records) == 2 and all(len(line) < 400 for line in lines)
    served_record, refused_record = sorted(records, key=lambda record: record["status"])
    assert served_record == {"request_id": context.request_ids[0], "status": 200, "size": "64x48", "styles": 1,
                             "masks": 0, "presets": [], "batch": 1, "checkpoint": False, "tile": None, "steps": 2,
                             "precision": "fp32", "seconds": served_record["seconds"], "stop_reason": "steps",
                             "queue_seconds": served_record["queue_seconds"],
                             "total_seconds": served_record["total_seconds"]}
    assert 0 <= served_record["queue_seconds"] <= served_record["total_seconds"]
    assert served_record["seconds"] <= served_record["total_seconds"]
    assert refused_record == {"request_id": context.request_ids[1], "status": 400, "error": "InvalidParameter",
                              "field": "steps", "total_seconds": refused_record["total_seconds"]}
    # and one line for the call: its schedule (handler/scheduler.py), here one group of the request it served
    (call,) = [json.loads(record.getMessage().split("style_transfer call ", 1)[1]) for record in caplog.records
               if "style_transfer call " in record.getMessage()]
    assert [group["requests"] for group in call["groups"]] == [[context.request_ids[0]]] and call["refused"] == []
    assert 0 <= call["groups"][0]["start"] < call["groups"][0]["deadline"] <= call["seconds"] <= 270


def test_a_style_scale_past_the_style_pixel_limit_is_refused(served):
    (body,), context = handle(served, {"content": CONTENT, "style": STYLE, "size": "1024", "style_scale": "4"})
    assert context.get_response_status(0)[0] == 413
    error = json.loads(body)
    assert error["field"] == "style_scale" and "style_scale at most" in error["message"]


def test_a_preset_needs_no_upload_and_masks_and_a_start_image_go_with_it(served):
    (body,), context = handle(served, {"content": CONTENT, "presets": "starry_night", "size": "64", "steps": "2"})
    assert context.get_response_status(0)[0] == 200 and Image.open(io.BytesIO(body)).size == (64, 48)
    row = {"content": CONTENT, "style": STYLE, "mask_1": mask_png(), "mask_2": mask_png(0.5),
           "init_image": CONTENT, "params": {"presets": ["shipwreck"], "init": "image", "size": 64, "steps": 2}}
    (body,), context = handle(served, row)
    assert context.get_response_status(0)[0] == 200, body


def test_a_json_body_carries_masks_and_the_start_image(served):
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    body = {"content": b64(CONTENT), "masks": [b64(mask_png())], "init_image": b64(CONTENT),
            "params": {"presets": ["starry_night"], "init": "image", "size": 64, "steps": 2, "response": "json"}}
    (answer,), context = handle(served, {"body": body})
    assert context.get_response_status(0)[0] == 200 and json.loads(answer)["steps"] == 2


def test_the_describe_call_is_answered_with_the_models_description(served):
    """TorchServe's management API asks the worker with a request of its own whose header "describe" is
    "True" (tests/test_creative_controls.py asks a real TorchServe); in a batch with predictions, each gets
    its own answer."""
    prediction = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 1}}
    (image, description), context = handle(served, prediction, {}, describe=(1,))
    assert context.get_response_content_type(1) == "application/json"
    assert Image.open(io.BytesIO(image)).size == (64, 48)
    described = json.loads(description)
    assert described["presets"] == [{"name": "shipwreck", "width": 512, "height": 353},
                                    {"name": "starry_night", "width": 512, "height": 320},
                                    {"name": "woman-with-hat-matisse", "width": 378, "height": 512}]
    parameters = {row["name"]: row for row in described["parameters"]}
    assert parameters["size"] == {"name": "size", "default": 256, "allowed": "an integer at least 32 and at most 1024",
                                  "schema": {"type": "integer", "minimum": 32, "maximum": 1024},
                                  "doc": "longer side of the output, px"}
    assert parameters["max_seconds"]["default"] == 240 and "at most 270" in parameters["max_seconds"]["allowed"]
    limits = described["limits"]
    assert limits["memory_budget_bytes"] == handler_of(served).preparation.memory_budget > 0
    assert set(limits["device_speed"]) == {"forward", "iteration", "encode_ns_per_pixel"}
    assert set(limits["device_speed"]["iteration"]["fp32"]) == {"ms_per_pass", "ns_per_mac"}
    assert {key: limits[key] for key in limits if key not in ("memory_budget_bytes", "device_speed")} == {
        "max_image_pixels": 40_000_000, "max_styles": 4, "max_style_pixels": 2_097_152,  # on a CPU (overrides)
        "max_decoded_pixels_per_call": 200_000_000, "maxima": {"size": 1024, "steps": 2000, "max_seconds": 270},
        "job_maxima": {"size": 2048, "steps": 2000, "max_seconds": 86400}}  # a job's segments may ask more
    assert (described["weights"], described["device"]) == ("random", "cpu")


def test_a_describe_header_on_the_inference_api_is_a_prediction(served):
    """Only the management API's customized=true describes the model: its frontend adds "url_path" to every
    inference request, whose headers are the client's own."""
    handler, context = served
    start_batch(context, 1)
    context.request_processor[0].get_request_properties()["describe"] = "True"
    (body,) = handler.handle([{"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 1}}], context)
    assert Image.open(io.BytesIO(body)).size == (64, 48)


def test_masked_and_unmasked_requests_never_share_a_batch(served, monkeypatch):
    preparation = handler_of(served).preparation
    white = mask_png()
    row = {"content": CONTENT, "style": STYLE, "style_2": STYLE, "params": {"size": 64, "steps": 2}}
    prepared = {0: dict(row), 1: {**row, "mask_1": white}, 2: {**row, "mask_2": white, "mask_1": white},
                3: {"content": CONTENT, "style": STYLE, "mask_1": white, "params": row["params"]}}
    prepared = {index: preparation.prepare(request, grpc=False) for index, request in prepared.items()}
    assert grouped(preparation, prepared, 2**60, monkeypatch) == [(0,), (1, 2), (3,)]  # memory no bound here


def test_the_handler_stops_a_canceled_job_and_answers_the_others_in_full(served, redis_server, monkeypatch):
    handler, context = served
    # the jobs service's cancel key (jobs/store.py), read as the worker reads it (handler/cancellation.py)
    monkeypatch.setattr(handler, "cancel_signals", CancelSignals(redis_server.url))
    redis.Redis.from_url(redis_server.url).set(CANCEL_KEY_PREFIX + "gone.1", "1", ex=60)
    start_batch(context, 2)
    context.request_processor[0].get_request_properties()["X-Style-Job-Id"] = "gone.1"
    context.request_processor[1].get_request_properties()["X-Style-Job-Id"] = "kept.1"
    row = {"content": CONTENT, "style": STYLE, "size": "32", "steps": "6", "early_stop_tol": "0"}
    handler.handle([dict(row), dict(row)], context)
    canceled, kept = (context.get_response_headers(i) for i in (0, 1))
    assert (canceled["X-Style-Stop-Reason"], canceled["X-Style-Steps"]) == ("canceled", "0")
    assert (kept["X-Style-Stop-Reason"], kept["X-Style-Steps"]) == ("steps", "6")


# --- the client's wait (the proxy's X-Request-Start and X-Request-Timeout-Ms) -------------------------------------

@pytest.mark.parametrize("start, timeout, expected", [
    ("t=1733234567.123", "310000", (1733234567.123, 310.0)),  # nginx's $msec, as our proxies send it
    ("t=1733234567123", "4000", (1733234567.123, 4.0)),  # milliseconds (Heroku's router)
    ("1733234567123456", "4000", (1733234567.123456, 4.0)),  # microseconds, without "t=" (HAProxy, Apache)
    (" t=1733234567.5 ", " 2500 ", (1733234567.5, 2.5)),
])
def test_the_client_wait_is_read_from_the_proxy_headers(start, timeout, expected):
    from scheduler import ClientWait

    wait = ClientWait.from_headers({"X-Request-Start": start, "x-request-timeout-ms": timeout})
    assert (wait.arrived, wait.timeout) == pytest.approx(expected)
    assert wait.left(expected[0] + 1) == pytest.approx(expected[1] - 1)


@pytest.mark.parametrize("headers", [
    {}, {"X-Request-Start": "t=1733234567.123"}, {"X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=", "X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=abc", "X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=-5", "X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=1e9", "X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=0", "X-Request-Timeout-Ms": "310000"},
    {"X-Request-Start": "t=1733234567.123", "X-Request-Timeout-Ms": "310s"},
    {"X-Request-Start": "t=1733234567.123", "X-Request-Timeout-Ms": "0"},
    {"X-Request-Start": "t=1733234567.123", "X-Request-Timeout-Ms": "nan"},
    {"X-Request-Start": {"content-type": ""}, "X-Request-Timeout-Ms": "310000"},  # a gRPC parameter's type
])
def test_a_missing_or_malformed_client_wait_means_no_check(headers):
    from scheduler import ClientWait

    assert ClientWait.from_headers(headers) is None


def handle_with_waits(served, rows: list[dict], waits: list):
    """Each row with its proxy's headers: (seconds it has waited, its client's timeout in seconds), a dict of
    headers as sent, or None for none."""
    import time

    handler, context = served
    start_batch(context, len(rows))
    for index, wait in enumerate(waits):
        if isinstance(wait, tuple):
            wait = {"X-Request-Start": f"t={time.time() - wait[0]:.3f}",
                    "X-Request-Timeout-Ms": f"{wait[1] * 1000:.0f}"}
        context.request_processor[index].get_request_properties().update(wait or {})
    return handler.handle(rows, context), context


def logged_requests(caplog) -> list[dict]:
    return [json.loads(record.getMessage().split("style_transfer request ", 1)[1]) for record in caplog.records
            if "style_transfer request" in record.getMessage()]


def emitted_metrics(caplog, name: str) -> list[str]:
    """The metric lines the worker writes for TorchServe's frontend (ts.metrics: "[METRICS]name.unit:value|#...")."""
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(f"[METRICS]{name}.")]


def test_a_request_that_outwaited_its_client_is_dropped_before_any_decoding(served, caplog):
    """503 Expired with Retry-After (how long past its client's wait), counted and logged; its content is not
    even an image, which decoding would answer with 400. Beside it, a request with time left, one without the
    headers (a direct client) and one with a malformed start are computed."""
    good = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 1}}
    not_an_image = {"content": b"not an image", "style": STYLE, "params": {"size": 64, "steps": 1}}
    malformed = {"X-Request-Start": "yesterday", "X-Request-Timeout-Ms": "310000"}
    with caplog.at_level("INFO"):
        (dropped, *computed, since_1970), context = handle_with_waits(
            served, [not_an_image, good, good, good, good],
            [(312.5, 310), (5, 310), None, malformed, {"X-Request-Start": "t=1", "X-Request-Timeout-Ms": "1000"}])
    error = json.loads(dropped)
    assert context.get_response_status(0)[0] == 503, error
    assert (error["code"], error["type"], error["field"]) == (503, "Expired", None)
    assert "waited 312.5 s" in error["message"] and "(310 s" in error["message"]
    assert context.get_response_headers(0)["Retry-After"] == "3"
    assert [context.get_response_status(i)[0] for i in (1, 2, 3)] == [200, 200, 200]
    # a claim to have waited since 1970: no Retry-After beyond a request's time here
    handler, _ = served
    assert context.get_response_headers(4)["Retry-After"] == str(math.ceil(handler.preparation.time_cap))
    (record,) = [r for r in logged_requests(caplog) if r["request_id"] == context.request_ids[0]]
    assert record == {"request_id": context.request_ids[0], "status": 503, "error": "Expired", "field": None,
                      "total_seconds": record["total_seconds"]}  # nothing decoded, nothing run
    expired = [line for line in emitted_metrics(caplog, "StyleRefusals") if "Reason:expired" in line]
    assert [line.rsplit(",", 1)[-1] for line in expired] == [context.request_ids[0], context.request_ids[4]]
    assert all(":1|#ModelName:style_transfer" in line for line in expired)


def test_a_request_gets_only_the_time_its_client_still_waits(served):
    """Past the reply margin the call keeps back (30 s), a request whose client waits 1.5 s more stops with its
    best image by then; one whose client's end leaves less than its fixed work is answered 503 Busy at once."""
    import time

    long = {"content": CONTENT, "style": STYLE, "params": {"size": 64, "steps": 2000}}
    started = time.monotonic()
    (image,), context = handle_with_waits(served, [long], [(0, 31.5)])
    assert context.get_response_status(0)[0] == 200 and time.monotonic() - started < 1.5 + 0.5
    assert context.get_response_headers(0)["X-Style-Stop-Reason"] == "max_seconds"
    (busy,), context = handle_with_waits(served, [long], [(2, 31)])
    assert context.get_response_status(0)[0] == 503 and json.loads(busy)["type"] == "Busy"
    assert "client's timeout" in json.loads(busy)["message"] and "Retry-After" in context.get_response_headers(0)
