"""Schemathesis hooks for tests/support/fuzz_api.py: real images among the generated ones, real jobs among the job ids,
and the checks that no schema states.

Loaded by Schemathesis (SCHEMATHESIS_HOOKS), not imported by the project. On the predictions endpoint only POST
is the contract: the coverage phase also tries other methods, which TorchServe answers in its own ways
(openapi.yaml says how). Generated file parts and base64 strings are sometimes small real images, so that
requests get past decoding into the optimisation, and otherwise whatever Schemathesis makes (random bytes, 1x1
files of many formats). A job id in a path is sometimes one of FUZZ_JOB_IDS (jobs the runner submitted and ran to
their end before the run), so that status, events, result and cancel meet real jobs, not only unknown ids.
The checks:
- `answers_are_what_they_say`: an image answer (of the predictions endpoint or a job's result) decodes as its
  content type and carries every X-Style-* header; a `response=json` answer's image decodes as its `format`, at
  its `width` and `height`.
- `a_500_is_torchserves_own`: the only 500 allowed is TorchServe's for a body its multipart decoder refuses
  (openapi.yaml, `UndecodableBody`); a 500 from our handler is a bug.
- `streams_are_json_lines`: a stream is JSON lines, each a StreamEvent of openapi.yaml, progress events first
  and exactly one `done` or `error` event last (Schemathesis reads no NDJSON itself).
- `job_errors_name_the_field`: a jobs API error is the predictions endpoint's JSON error body with its own
  status as `code`; one the client's input caused (400, 401, 413, 422) names the field at fault (which may be
  the empty name a client gave a key).
- `job_events_are_server_sent_events`: a job's events are server-sent events, after the stream's `retry:`, each
  with an id, a name out of JobEventName and a JSON object as data, ending with the job's end event; none only
  after a Last-Event-ID.
"""

import base64
import io
import json
import os
from pathlib import Path

import jsonschema
import schemathesis
import yaml
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
STREAM_EVENT = jsonschema.Draft202012Validator({**SPEC, "$ref": "#/components/schemas/StreamEvent"})
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
STYLE_HEADERS = ("X-Style-Steps", "X-Style-Seconds", "X-Style-Loss", "X-Style-Stop-Reason", "X-Style-Precision")
PREDICTIONS = "/predictions/style_transfer"
JOB_RESULT, JOB_EVENTS = "/jobs/{id}/result", "/jobs/{id}/events"
JOB_ERROR = jsonschema.Draft202012Validator({**SPEC, "$ref": "#/components/schemas/JobErrorBody"})
JOB_EVENT_NAMES = SPEC["components"]["schemas"]["JobEventName"]["enum"]
JOB_END_EVENTS = ("done", "error", "canceled")
ERRORS_NAMING_A_FIELD = (400, 401, 413, 422)  # what the client's input caused: it must say what to change
KNOWN_JOBS = [job_id for job_id in os.environ.get("FUZZ_JOB_IDS", "").split(",") if job_id]


def _small_images() -> list[bytes]:
    """The content photo, a painting and a grey mask, a few kB each, in formats the server reads."""
    photo = Image.open(ROOT / "samples" / "tubingen.jpg").convert("RGB")
    painting = Image.open(ROOT / "samples" / "styles" / "starry_night.jpg").convert("RGB")
    images = []
    for image, size, fmt in ((photo, (64, 48), "JPEG"), (painting, (48, 30), "PNG"), (photo, (40, 30), "WEBP"),
                             (Image.new("L", (32, 24), 128), (32, 24), "PNG")):
        out = io.BytesIO()
        image.resize(size).save(out, fmt)
        images.append(out.getvalue())
    return images


SMALL_IMAGES = _small_images()
# Schemathesis's own strategies go on as the other branch: they generate the values for the other formats.
schemathesis.openapi.format("binary", st.one_of(st.sampled_from(SMALL_IMAGES), st.binary()))
schemathesis.openapi.format("byte", st.one_of(st.sampled_from(SMALL_IMAGES), st.binary()).map(
    lambda data: base64.b64encode(data).decode("ascii")))


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    if not KNOWN_JOBS or "id" not in (path_parameters or {}):  # none: the coverage phase leaves them out
        return st.just(path_parameters)
    return st.one_of(st.just(path_parameters),
                     st.sampled_from(KNOWN_JOBS).map(lambda job_id: {**path_parameters, "id": job_id}))


def _media_type(response) -> str:
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip().lower()


def _header(response, name: str) -> str | None:
    values = response.headers.get(name.lower())
    return values[0] if values else None


def _assert_image(data: bytes, fmt: str, size: tuple[int, int] | None = None) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt, f"an answer said {fmt} but holds {image.format}"
    assert size is None or image.size == size, f"the image is {image.size}, the answer said {size}"
    image.load()


@schemathesis.check
def answers_are_what_they_say(ctx, response, case):
    answer = (case.path, case.method.upper()) in ((PREDICTIONS, "POST"), (JOB_RESULT, "GET"))
    if not answer or response.status_code != 200:
        return None
    media_type = _media_type(response)
    if media_type in PIL_FORMATS:
        missing = [name for name in STYLE_HEADERS if _header(response, name) is None]
        assert not missing, f"an image answer without {', '.join(missing)}"
        _assert_image(response.content, PIL_FORMATS[media_type])
    elif media_type == "application/json":
        result = json.loads(response.content)
        _assert_image(base64.b64decode(result["image"]), PIL_FORMATS[f"image/{result['format']}"],
                      (result["width"], result["height"]))
    return None


@schemathesis.check
def streams_are_json_lines(ctx, response, case):
    if case.path != PREDICTIONS or case.method.upper() != "POST" or _media_type(response) != "application/x-ndjson":
        return None
    text = response.content.decode("utf-8")
    assert text.endswith("\n"), "a stream must end with a complete line"
    events = [json.loads(line) for line in text.splitlines()]
    for number, event in enumerate(events, start=1):
        errors = [error.message for error in STREAM_EVENT.iter_errors(event)]
        assert not errors, f"line {number} of the stream is no StreamEvent: {errors[:3]}"
    assert all(event["event"] == "progress" for event in events[:-1]), "only progress events before the last"
    assert events[-1]["event"] in ("done", "error"), "a stream ends with a done or an error event"
    if events[-1]["event"] == "done":
        done = events[-1]
        _assert_image(base64.b64decode(done["image"]), PIL_FORMATS[f"image/{done['format']}"],
                      (done["width"], done["height"]))
    return None


@schemathesis.check
def a_500_is_torchserves_own(ctx, response, case):
    if case.path != PREDICTIONS or response.status_code != 500:
        return None
    error = json.loads(response.content)
    assert error.get("type") == "ErrorDataDecoderException", f"a 500 that is not TorchServe's decoder's: {error}"
    return None


@schemathesis.check
def job_errors_name_the_field(ctx, response, case):
    if not case.path.startswith("/jobs") or not 400 <= response.status_code < 500:
        return None
    assert _media_type(response) == "application/json", f"a {response.status_code} that is not JSON"
    error = json.loads(response.content)
    problems = [problem.message for problem in JOB_ERROR.iter_errors(error)]
    assert not problems, f"not the JSON error body: {problems[:3]}"
    assert error["code"] == response.status_code, f"a {response.status_code} whose body says {error['code']}"
    if response.status_code in ERRORS_NAMING_A_FIELD:
        assert isinstance(error.get("field"), str), f"a {response.status_code} that names no field: {error}"
    return None


@schemathesis.check
def job_events_are_server_sent_events(ctx, response, case):
    if case.path != JOB_EVENTS or response.status_code != 200:
        return None
    text = response.content.decode("utf-8")
    blocks = [_sse_event(block) for block in text.split("\n\n") if block and not block.startswith(":")]
    assert blocks and blocks[0].keys() == {"retry"} and blocks[0]["retry"].isdigit(), \
        "a stream first says when to reconnect (retry:)"
    events = blocks[1:]
    if not events:  # all were before Last-Event-ID, and the job has ended; else its queued event comes first
        assert "last-event-id" in {name.lower() for name in case.headers or {}}, "no events, not even queued"
        return None
    for event in events:
        assert event.keys() >= {"id", "event", "data"}, f"an event without its id, name or data: {event}"
        assert event["event"] in JOB_EVENT_NAMES, f"an event named {event['event']!r}"
        assert isinstance(json.loads(event["data"]), dict), f"{event['event']}'s data is no JSON object"
    assert [event["event"] for event in events[:-1] if event["event"] in JOB_END_EVENTS] == [], \
        "an end event before the last"
    assert events[-1]["event"] in JOB_END_EVENTS, "the events stop before the job's end event"
    return None


def _sse_event(block: str) -> dict:
    fields = {}
    for line in block.splitlines():
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return fields
