"""Segments: a run suspended with iterations left and resumed from its checkpoint reads as one run and reaches
what the unsegmented run reaches; a checkpoint is plain data, checked before use (style_engine/segments.py)."""

import base64
import json
import struct
from dataclasses import replace

import pytest
import torch

import streaming
from conftest import SAMPLES, STYLES
from handler_context import start_batch
from style_engine import ParamError, StyleJob, TooLargeError, parse_params, stylize_batch
from style_engine.targets import output_size
from style_engine.optimize import scale_sizes
from style_engine.segments import MAGIC, Checkpoint, check_resume, decode_checkpoint


def params(**overrides):
    return parse_params({"size": 96, "steps": 40, "min_scale": 48, "early_stop_tol": 0, **overrides})[0]


def every(iterations: int):
    """A suspend predicate that ends a segment after this many iterations of it."""
    count = {"n": 0}

    def suspend() -> bool:
        count["n"] += 1
        return count["n"] >= iterations  # asked first once the segment has run one

    return suspend


def segmented(extractor, job: StyleJob, iterations: int, progress: list):
    """The run as segments of `iterations` each, every checkpoint sent through its bytes; the results in order."""
    results, resume = [], None
    while True:
        result = stylize_batch(extractor, [job], resume=resume, suspend=every(iterations),
                               callback=progress.append)[0]
        results.append(result)
        if result.checkpoint is None:
            return results
        resume = decode_checkpoint(result.checkpoint.encode())


def test_a_segmented_run_reaches_the_unsegmented_objective_within_2_percent(extractor, content, style):
    job = StyleJob(content, (style,), params())
    whole = stylize_batch(extractor, [job])[0]
    progress = []
    parts = segmented(extractor, job, 7, progress)
    assert len(parts) >= 5 and all(part.stop_reason == "segment" for part in parts[:-1])
    last = parts[-1]
    assert last.steps == whole.steps == 40 and last.stop_reason == "steps"
    assert abs(last.final_loss["total"] - whole.final_loss["total"]) <= 0.02 * whole.final_loss["total"]
    assert last.initial_loss == whole.initial_loss
    steps = [p.step for p in progress]
    assert steps == list(range(1, 41))  # one run's progress: each step once, continued across segments
    assert {p.scale for p in progress} == {1, 2} and last.image.shape == whole.image.shape


def test_a_checkpoint_stops_at_its_scale_and_resumes_there(extractor, content, style):
    job = StyleJob(content, (style,), params())
    first = stylize_batch(extractor, [job], suspend=every(3))[0]
    checkpoint = first.checkpoint
    assert checkpoint.steps == 3 and checkpoint.scale == 0 and checkpoint.scale_until == 20
    assert tuple(checkpoint.image.shape[-2:]) == scale_sizes([job], (72, 96))[0]
    decoded = decode_checkpoint(checkpoint.encode())
    assert torch.equal(decoded.image, checkpoint.image) and decoded.loss == checkpoint.loss
    assert set(decoded.optimizer) == {"previous_x", "previous_g", "s", "y"} and decoded.optimizer["s"].shape[0] == 2


def forged(checkpoint: Checkpoint, **header_changes) -> bytes:
    data = checkpoint.encode()
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = {**json.loads(data[start:start + length]), **header_changes}
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + data[start + length:]


@pytest.fixture(scope="module")
def a_checkpoint():
    return Checkpoint(image=torch.rand(3, 36, 48), scale=0, scales=2, scale_until=20, steps=3, seconds=1.5,
                      initial_loss=dict(content=0.0, style=2.0, tv=0.1, total=2.1),
                      loss=dict(content=0.5, style=1.0, tv=0.1, total=1.6))


@pytest.mark.parametrize("data, says", [
    (b"", "wrong magic"),
    (b"\x80\x04pickle", "wrong magic"),
    (MAGIC + struct.pack("<I", 10**9), "out of bounds"),
    (MAGIC + struct.pack("<I", 3) + b"{{{", "not JSON"),
    (MAGIC + struct.pack("<I", 2) + b"[]", "not a JSON object"),
])
def test_a_garbled_checkpoint_is_refused_naming_the_field(data, says):
    with pytest.raises(ParamError, match=says) as refused:
        decode_checkpoint(data)
    assert refused.value.field == "checkpoint"


N = 3 * 36 * 48


@pytest.mark.parametrize("changes, says", [
    ({"tensors": [["image", [3, 37, 48]]]}, "bytes of tensors"),
    ({"tensors": [["image", [3, -1, 48]]]}, "shape of its tensor image"),
    ({"tensors": [["image", [4, 36, 48]]]}, "must have the shape"),
    ({"tensors": "image"}, "must be a list"),
    ({"tensors": [["image", [3, 36, 48]], ["s", [1, N]]]}, "either none or all"),
    ({"tensors": [["image", [3, 36, 48]], ["previous_x", [N]], ["previous_g", [N]], ["s", [21, N]],
                  ["y", [21, N]]]}, "at most 20 curvature pairs"),
    ({"tensors": [["image", [3, 36, 48]], ["previous_x", [N]], ["previous_g", [N]], ["s", [1, N]],
                  ["y", [1, N + 1]]]}, "do not fit its image"),
    ({"steps": "3"}, "'steps' must be an integer"),
    ({"seconds": float("nan")}, "'seconds' must be a number"),
    ({"loss": {"total": 1}}, "'loss' must hold"),
])
def test_a_forged_checkpoint_header_is_refused_naming_the_field(a_checkpoint, changes, says):
    with pytest.raises(ParamError, match=says) as refused:
        decode_checkpoint(forged(a_checkpoint, **changes))
    assert refused.value.field == "checkpoint"


def test_a_checkpoint_of_another_request_is_refused(a_checkpoint):
    sizes = [(36, 48), (72, 96)]
    check_resume(a_checkpoint, sizes, 40)
    for wrong_sizes, steps in (([(40, 48), (80, 96)], 40), (sizes[1:], 40), (sizes, 3), ([*sizes, (144, 192)], 40)):
        with pytest.raises(ParamError) as refused:
            check_resume(a_checkpoint, wrong_sizes, steps)
        assert refused.value.field == "checkpoint"


def test_an_image_outside_the_unit_range_is_refused(a_checkpoint):
    data = bytearray(a_checkpoint.encode())
    data[-4:] = struct.pack("<f", float("inf"))
    with pytest.raises(ParamError, match="not finite"):
        decode_checkpoint(bytes(data))
    data[-4:] = struct.pack("<f", 1.5)
    with pytest.raises(ParamError, match=r"image has values outside \[0, 1\]"):
        decode_checkpoint(bytes(data))


def test_a_forged_optimiser_state_is_refused_or_harmless(extractor, content, style):
    """Steps larger than an image allows are refused; curvature pairs that fail the curvature condition are
    left out as the optimiser would have: the run goes on, its image in [0, 1]."""
    job = StyleJob(content, (style,), params(steps=8))
    checkpoint = stylize_batch(extractor, [job], suspend=every(3))[0].checkpoint
    state = checkpoint.optimizer
    with pytest.raises(ParamError, match=r"tensor s has values outside \[-1, 1\]"):
        decode_checkpoint(replace(checkpoint, optimizer={**state, "s": state["s"] * 1e6}).encode())
    opposed = replace(checkpoint, optimizer={**state, "y": -state["y"]})
    result = stylize_batch(extractor, [job], resume=decode_checkpoint(opposed.encode()))[0]
    assert result.steps == 8 and 0 <= float(result.image.min()) and float(result.image.max()) <= 1


# --- a segment through the handler (in-process, as TorchServe's worker runs it) ----------------------------------

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
JOB_HEADERS = {"X-Style-Job-Id": "client:job.run1", "X-Style-Segment-Seconds": "0.001"}


def handle(served, row: dict, headers: dict, monkeypatch) -> tuple[list[dict], object]:
    """One request with these headers: the JSON lines it streamed (progress and leading lines) and answered."""
    handler, context = served
    sent = []
    monkeypatch.setattr(streaming, "send_intermediate_predict_response",
                        lambda chunks, *args: sent.extend(chunks.values()))
    start_batch(context, 1)
    context.request_processor[0].get_request_properties().update(headers)
    answer = handler.handle([row], context)[0]
    return [json.loads(line) for line in [*sent, answer] if isinstance(line, str) and line.startswith("{")], context


def test_a_job_runs_through_the_handler_as_segments_and_reads_as_one_run(served, monkeypatch):
    row = {"content": CONTENT, "style": STYLE, "size": "48", "steps": "6", "min_scale": "48", "early_stop_tol": "0",
           "stream": "true"}
    segments, done = 0, None
    while done is None:
        lines, context = handle(served, dict(row), JOB_HEADERS, monkeypatch)
        last = lines[-1]
        assert context.get_response_status(0)[0] in (None, 200), lines
        if last["event"] == "done":
            done = last
            break
        assert last["event"] == "segment" and last["step"] == segments + 1  # one iteration a segment here
        pieces = b"".join(base64.b64decode(line["data"]) for line in lines if line["event"] == "checkpoint")
        assert len(pieces) == last["checkpoint_bytes"]
        row["checkpoint"], segments = pieces, segments + 1
    assert segments == 5 and done["steps"] == 6 and done["stop_reason"] == "steps"


@pytest.mark.parametrize("checkpoint, says", [(b"not a checkpoint", "wrong magic"), (b"", "wrong magic"),
                                              (MAGIC + struct.pack("<I", 2) + b"{}", "'tensors'")])
def test_a_forged_checkpoint_part_is_a_400_naming_it(served, monkeypatch, checkpoint, says):
    row = {"content": CONTENT, "style": STYLE, "size": "48", "steps": "6", "stream": "true",
           "checkpoint": checkpoint}
    lines, context = handle(served, row, JOB_HEADERS, monkeypatch)
    assert context.get_response_status(0)[0] == 400
    assert lines[-1]["field"] == "checkpoint" and says in lines[-1]["message"]


def test_a_checkpoint_of_other_settings_is_a_400(served, monkeypatch, a_checkpoint):
    row = {"content": CONTENT, "style": STYLE, "size": "64", "steps": "6", "stream": "true",
           "checkpoint": a_checkpoint.encode()}
    lines, context = handle(served, row, JOB_HEADERS, monkeypatch)
    assert context.get_response_status(0)[0] == 400 and lines[-1]["field"] == "checkpoint"


def test_a_segment_must_stream(served, monkeypatch):
    row = {"content": CONTENT, "style": STYLE, "size": "48", "steps": "6"}
    lines, context = handle(served, row, JOB_HEADERS, monkeypatch)
    assert context.get_response_status(0)[0] == 400 and lines[-1]["field"] == "stream"


def test_a_size_only_jobs_may_ask_is_a_413_naming_the_jobs_api_and_admitted_as_a_job(served):
    """On a CPU a direct request may ask size 1024 and a job 2048 (model-config.yaml)."""
    handler, _ = served
    preparation = handler.preparation
    row = {"content": CONTENT, "style": STYLE, "size": "2048", "steps": "2", "style_scale": "0.5", "stream": "true"}
    with pytest.raises(TooLargeError, match=r"jobs API \(POST /jobs\).* size 2048") as refused:
        preparation.prepare(dict(row), grpc=False)
    assert refused.value.field == "size" and refused.value.status == 413
    prepared = preparation.prepare(dict(row), grpc=False, headers=JOB_HEADERS)
    assert output_size(prepared.job)[1] == 2048 and prepared.segment.seconds == 0.001
    with pytest.raises(ParamError, match="at most 2048"):
        preparation.prepare({**row, "size": "2049"}, grpc=False, headers=JOB_HEADERS)
