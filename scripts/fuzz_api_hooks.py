"""Schemathesis hooks for scripts/fuzz_api.py: real images among the generated ones, and the checks that no
schema states.

Loaded by Schemathesis (SCHEMATHESIS_HOOKS), not imported by the project. Only POST is the contract: the
coverage phase also tries other methods, which TorchServe answers in its own ways (openapi.yaml says how).
Generated file parts and base64 strings are sometimes small real images, so that requests get past decoding into
the optimisation, and otherwise whatever Schemathesis makes (random bytes, 1x1 files of many formats). The
checks:
- `answers_are_what_they_say`: an image answer decodes as its content type and carries every X-Style-*
  header; a `response=json` answer's image decodes as its `format`, at its `width` and `height`.
- `a_500_is_torchserves_own`: the only 500 allowed is TorchServe's for a body its multipart decoder refuses
  (openapi.yaml, `UndecodableBody`); a 500 from our handler is a bug.
- `streams_are_json_lines`: a stream is JSON lines, each a StreamEvent of openapi.yaml, progress events first
  and exactly one `done` or `error` event last (Schemathesis reads no NDJSON itself).
"""

import base64
import io
import json
from pathlib import Path

import jsonschema
import schemathesis
import yaml
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
STREAM_EVENT = jsonschema.Draft202012Validator({**SPEC, "$ref": "#/components/schemas/StreamEvent"})
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
STYLE_HEADERS = ("X-Style-Steps", "X-Style-Seconds", "X-Style-Loss", "X-Style-Stop-Reason", "X-Style-Precision")


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
    if case.method.upper() != "POST" or response.status_code != 200:
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
    if case.method.upper() != "POST" or _media_type(response) != "application/x-ndjson":
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
    if response.status_code != 500:
        return None
    error = json.loads(response.content)
    assert error.get("type") == "ErrorDataDecoderException", f"a 500 that is not TorchServe's decoder's: {error}"
    return None
