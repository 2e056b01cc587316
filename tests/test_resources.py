"""Running out of memory, in-process with a real TorchServe Context: a 507 with a message, then the same
handler serves the next request. (The wall-clock budget is tested over HTTP, in test_faults.py.)"""

import io
import json
import logging
import re

import pytest
import torch
from PIL import Image

from conftest import SAMPLES, STYLES
from handler_context import make_context, model_dir_with_weights, start_batch
from streaming import ProgressStream
from style_engine.targets import GramCache
from style_transfer_handler import StyleTransferHandler

REQUEST = {"content": (SAMPLES / "tubingen.jpg").read_bytes(), "style": (STYLES / "starry_night.jpg").read_bytes(),
           "params": {"size": 64, "steps": 2}}


def allocate_a_pebibyte(device: torch.device) -> None:
    """What a request too large for the device does: a real allocation failure from torch's allocator."""
    torch.empty(2**50, dtype=torch.uint8, device=device)


def fail_like_a_bug(device: torch.device) -> None:
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x2 and 3x4)")


class FailsOnce:
    """The handler's extractor, except that its call number `after` + 1 first runs `failure` on the images'
    device."""

    def __init__(self, extractor, failure, after: int = 0):
        self.extractor, self.failure, self.calls_left = extractor, failure, after
        self.armed = True

    def __getattr__(self, name):
        return getattr(self.extractor, name)

    def __call__(self, images, *args, **kwargs):
        if self.armed and self.calls_left == 0:
            self.armed = False
            self.failure(images.device)
        self.calls_left -= 1
        return self.extractor(images, *args, **kwargs)


@pytest.fixture(scope="module")
def initialized(tmp_path_factory, random_state_dict):
    context = make_context(model_dir_with_weights(tmp_path_factory.mktemp("model"), random_state_dict),
                           {"weights": "random"})
    handler = StyleTransferHandler()
    handler.initialize(context)
    return handler, context


@pytest.fixture
def handler_and_context(initialized, monkeypatch):
    """The module's handler (a worker starts in seconds) as a new one serves: the extractor a test replaces is
    put back after it, and its Gram cache starts empty, so that each test counts the extractor's calls alike."""
    handler, context = initialized
    monkeypatch.setattr(handler, "extractor", handler.extractor)
    monkeypatch.setattr(handler, "gram_cache", GramCache(handler.config.gram_cache_entries,
                                                         handler.config.preset_gram_cache_entries))
    return handler, context


def handle(handler, context, row, grpc=False):
    start_batch(context, 1, grpc)
    return handler.handle([row], context)[0]


def metric_samples(caplog, name: str) -> list[tuple[str, str]]:
    """(value, dimensions) of the worker's metric log lines for `name`, the lines TorchServe's frontend turns into
    Prometheus samples: `[METRICS]name.unit:value|#dimension:value,…|#type:…`."""
    lines = (re.match(r"\[METRICS\](\w+)\.\w+:([^|]+)\|#([^|]*)\|", r.getMessage()) for r in caplog.records)
    return [(line[2], line[3]) for line in lines if line and line[1] == name]


def test_out_of_memory_is_a_507_and_the_next_request_is_served(handler_and_context):
    handler, context = handler_and_context
    handler.extractor = FailsOnce(handler.extractor, allocate_a_pebibyte)
    body = handle(handler, context, REQUEST)
    assert context.get_response_status(0) == (507, "OutOfMemory")
    assert json.loads(body) == {
        "code": 507, "type": "OutOfMemory", "field": "size",
        "message": "the device ran out of memory for this request; try a smaller size or fewer style images"}
    body = handle(handler, context, REQUEST)  # the same handler; its extractor now allocates normally
    assert context.get_response_status(0)[0] in (None, 200) and not handler.extractor.armed
    assert Image.open(io.BytesIO(body)).size == (64, 48)


def test_an_out_of_memory_answer_is_counted_by_stage_and_other_failures_are_not(handler_and_context, caplog):
    handler, context = handler_and_context
    caplog.set_level(logging.INFO, logger="ts.metrics")
    handler.extractor = FailsOnce(handler.extractor, fail_like_a_bug)
    handle(handler, context, REQUEST)
    assert metric_samples(caplog, "StyleOutOfMemory") == []
    handler.extractor = FailsOnce(handler.extractor.extractor, allocate_a_pebibyte)
    handle(handler, context, REQUEST)
    assert metric_samples(caplog, "StyleOutOfMemory") == [("1", "ModelName:style_transfer,Level:Model,Stage:run")]


def test_a_worker_start_is_counted_and_sets_the_alerted_counters_to_zero(tmp_path, random_state_dict, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics")
    context = make_context(model_dir_with_weights(tmp_path, random_state_dict), {"weights": "random"})
    StyleTransferHandler().initialize(context)
    model = "ModelName:style_transfer,Level:Model"
    assert metric_samples(caplog, "StyleWorkerStarts") == [("1", model)]
    assert metric_samples(caplog, "StyleOptimizationSeconds") == [("0", model)]
    stages = [("0", f"{model},Stage:{stage}") for stage in ("prepare", "run", "encode")]
    assert metric_samples(caplog, "StyleOutOfMemory") == stages
    assert metric_samples(caplog, "StyleInternalErrors") == stages
    assert metric_samples(caplog, "StyleStreamErrors") == [("0", model)]


def test_a_streamed_request_that_fails_before_its_first_chunk_gets_the_usual_error(handler_and_context):
    handler, context = handler_and_context
    handler.extractor = FailsOnce(handler.extractor, allocate_a_pebibyte)
    body = handle(handler, context, {**REQUEST, "params": {**REQUEST["params"], "stream": True}})
    assert context.get_response_status(0) == (507, "OutOfMemory")
    assert context.get_response_content_type(0) == "application/json"
    assert json.loads(body)["type"] == "OutOfMemory"


def test_a_stream_that_fails_after_it_began_ends_with_an_error_line(handler_and_context, monkeypatch):
    """Its status (200) and content type went out with the first chunk: the error is its last NDJSON line."""
    chunks = []
    monkeypatch.setattr(ProgressStream, "send", lambda stream, chunk: (chunks.append(chunk),
                                                                      setattr(stream, "started", True)))
    handler, context = handler_and_context
    # the targets take 3 passes (content, style, float32 initial image), then each iteration one
    handler.extractor = FailsOnce(handler.extractor, allocate_a_pebibyte, after=5)
    params = {"size": 64, "steps": 20, "early_stop_tol": 0, "stream": True, "precision": "fp32"}
    line = json.loads(handle(handler, context, {**REQUEST, "params": params}))
    assert chunks and all(json.loads(chunk)["event"] == "progress" for chunk in chunks)
    assert (line["event"], line["code"], line["type"], line["field"]) == ("error", 507, "OutOfMemory", "size")
    assert context.get_response_status(0)[0] in (None, 200)
    assert context.get_response_content_type(0) == "application/x-ndjson"


def test_other_runtime_errors_stay_internal_errors(handler_and_context):
    # The CPU allocator's failure is recognised by its message; any other RuntimeError is a bug: 500
    handler, context = handler_and_context
    handler.extractor = FailsOnce(handler.extractor, fail_like_a_bug)
    body = handle(handler, context, REQUEST)
    assert context.get_response_status(0) == (500, "InternalError")
    assert json.loads(body)["type"] == "InternalError"


def batch_of_three(handler, context, middle: dict) -> tuple[list, list]:
    """Two ordinary requests around `middle`, in one batch: their answers, and the handler's log lines."""
    rows = [REQUEST, {**REQUEST, "params": {**REQUEST["params"], **middle}}, REQUEST]
    start_batch(context, 3)
    return handler.handle(rows, context)


def assert_served(body) -> None:
    assert Image.open(io.BytesIO(body)).size == (64, 48)


def test_a_failure_decoding_one_request_of_a_batch_answers_it_and_serves_the_others(handler_and_context, caplog,
                                                                                    monkeypatch):
    import decoding

    def decode_or_run_out(request, params, *args):
        if params.seed == 13:
            raise MemoryError()  # what Pillow or numpy raise when an allocation fails
        return decode_job(request, params, *args)

    decode_job = decoding.decode_job
    monkeypatch.setattr(decoding, "decode_job", decode_or_run_out)
    caplog.set_level(logging.INFO)
    handler, context = handler_and_context
    first, failed, third = batch_of_three(handler, context, {"seed": 13})
    assert_served(first) and assert_served(third)
    assert context.get_response_status(1) == (507, "OutOfMemory")
    assert json.loads(failed)["message"].startswith("the worker ran out of memory while reading this request")
    assert metric_samples(caplog, "StyleOutOfMemory") == [("1", "ModelName:style_transfer,Level:Model,Stage:prepare")]
    assert '"status": 507' in caplog.text and "MemoryError" in caplog.text


def test_a_failure_encoding_one_answer_of_a_batch_answers_it_and_serves_the_others(handler_and_context, caplog,
                                                                                   monkeypatch):
    import answers

    def encode_or_fail(image, fmt, quality):
        if quality == 77:
            raise ValueError("encoder failure")
        return encode_image(image, fmt, quality)

    encode_image = answers.encode_image
    monkeypatch.setattr(answers, "encode_image", encode_or_fail)
    caplog.set_level(logging.INFO)
    handler, context = handler_and_context
    first, failed, third = batch_of_three(handler, context, {"format": "jpeg", "quality": 77})
    assert_served(first) and assert_served(third)
    assert context.get_response_status(1) == (500, "InternalError")
    assert context.get_response_content_type(1) == "application/json"
    assert json.loads(failed)["message"].startswith("the request failed unexpectedly while encoding")
    assert metric_samples(caplog, "StyleInternalErrors") == [
        ("1", "ModelName:style_transfer,Level:Model,Stage:encode")]
    assert "ValueError: encoder failure" in caplog.text
