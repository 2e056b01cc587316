"""A submitted job's body -> what is sent to TorchServe, and what the job's own fields ask for.

The body is the predictions endpoint's (CONTRACT.md "Request"), multipart or JSON, passed on with its images and
parameters untouched except: `stream` is set to true (the progress is what the events are made of, and every
chunk keeps the connection alive), and the jobs' own fields `webhook` and `webhook_events` are taken out (only
as fields of their own: inside `params` they are unknown parameters, as for the predictions endpoint). What is
passed on is checked here as the handler will read it (checks.py): what it would refuse before any work is
refused at submit with its error.
"""

import hashlib
import json
from dataclasses import dataclass

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from urllib3 import encode_multipart_formdata

from .checks import ServerLimits, refusal
from .store import EVENTS

JOB_FIELDS = ("webhook", "webhook_events")
DEFAULT_WEBHOOK_EVENTS = ("done", "error", "canceled")
TEXT_FIELDS = ("params", "response", *JOB_FIELDS)  # the fields read here
# Far above what a request holds (images, masks, one part per parameter), far below what a body of the size
# limit could hold as empty parts, each of which costs memory here and in the store.
MAX_PARTS = 256


class SubmitError(Exception):
    def __init__(self, code: int, type_: str, message: str, field: str | None):
        super().__init__(message)
        self.body = {"code": code, "type": type_, "message": message, "field": field}

    @classmethod
    def of(cls, body: dict) -> "SubmitError":
        return cls(body["code"], body["type"], body["message"], body["field"])


def too_large(max_bytes: int) -> SubmitError:
    return SubmitError(413, "TooLarge", f"the request is larger than the {max_bytes} bytes allowed", "body")


@dataclass(frozen=True)
class Submission:
    body: bytes
    content_type: str
    fingerprint: str
    response: str  # "image" or "json"
    webhook: str | None
    webhook_events: tuple[str, ...]


async def read_submission(request: web.Request, max_bytes: int, limits: ServerLimits) -> Submission:
    """The submission, or SubmitError with what the predictions endpoint (or the jobs service) refuses."""
    kind = request.content_type
    if kind == "multipart/form-data":
        return await _from_multipart(request, max_bytes, limits)
    if kind == "application/json":
        return _from_json(await request.read(), limits)
    raise SubmitError(400, "UnsupportedMediaType", "send the predictions endpoint's body: multipart/form-data or "
                                                   "application/json", "Content-Type")


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    data: bytes
    content_type: str | None


async def _from_multipart(request: web.Request, max_bytes: int, limits: ServerLimits) -> Submission:
    fields, digest, texts = [], hashlib.sha256(), {}
    for part in await _read_parts(request, max_bytes):
        if part.filename is not None:
            digest.update(f"{part.name}\0file\0{len(part.data)}\0".encode() + part.data)
        else:  # text as it was read before, so that a job submitted again finds its fingerprint the same
            value = part.data.decode("utf-8", "surrogateescape")
            digest.update(f"{part.name}\0text\0{len(value)}\0{value}".encode("utf-8", "surrogateescape"))
        if part.name in TEXT_FIELDS:  # clients may send any field as a file part (requests' files= does)
            texts[part.name] = part.data.decode("utf-8", "replace")
        if part.name not in JOB_FIELDS and part.name != "stream":
            fields.append((part.name, part.data if part.filename is None else
                           (part.filename or part.name, part.data, part.content_type)))
    fields.append(("stream", "true"))  # a plain field wins over params' own (handler/request_parsing.py)
    _check(dict((name, _as_torchserve_reads(value)) for name, value in fields), limits)
    body, content_type = encode_multipart_formdata(fields)
    params = _json_object(texts.get("params"))
    response = texts.get("response") or params.get("response")
    events = texts.get("webhook_events")
    return Submission(body, content_type, digest.hexdigest(), _response_kind(response), texts.get("webhook") or None,
                      _webhook_events(_comma_or_json_list(events) if events is not None else None))


async def _read_parts(request: web.Request, max_bytes: int) -> list[Part]:
    """Every part as the bytes it holds, within the request's size limit. Not aiohttp's request.post(), which
    decodes a part without a file name as text and fails on an image sent that way: TorchServe takes it."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    parts = []
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            # Checked at every part too: empty parts never reach the chunk loop below.
            if request.content.total_bytes > max_bytes:
                raise too_large(max_bytes)
            if len(parts) == MAX_PARTS:
                raise SubmitError(400, "ParamError", f"more than {MAX_PARTS} parts: send the images and at most "
                                                     f"one part per parameter", "body")
            if not isinstance(part, BodyPartReader):
                raise SubmitError(400, "ParamError", "a part holds another multipart body: send each image and "
                                                     "field as a part of its own", "body")
            if not part.name:  # TorchServe's decoder would refuse the body with a 500 (openapi.yaml)
                raise SubmitError(400, "ParamError", "a part has no name: every part needs Content-Disposition: "
                                                     "form-data; name=\"...\"", "body")
            data = bytearray()
            while chunk := await part.read_chunk():
                data.extend(chunk)
                if request.content.total_bytes > max_bytes:
                    raise too_large(max_bytes)
            parts.append(Part(part.name, part.filename, bytes(data), part.headers.get(hdrs.CONTENT_TYPE)))
    except (ValueError, HttpProcessingError) as error:  # no boundary, a broken body, unreadable part headers
        raise SubmitError(400, "ParamError", f"the multipart body cannot be read: {error}", "body") from None
    return parts


def _from_json(raw: bytes, limits: ServerLimits) -> Submission:
    try:
        body = json.loads(raw)
    except ValueError:
        raise SubmitError(400, "ParamError", "the body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise SubmitError(400, "ParamError", "the JSON body must be an object", "body")
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    webhook, events = body.pop("webhook", None), body.pop("webhook_events", None)
    if webhook is not None and not isinstance(webhook, str):
        raise SubmitError(400, "ParamError", "webhook must be a URL string", "webhook")
    params = body.get("params", {})
    if isinstance(params, str):
        params = _json_object(params) or params
    if isinstance(params, dict):  # anything else is passed on for the handler to refuse, as it would directly
        body["params"] = params = {**params, "stream": True}
    response = params.get("response") if isinstance(params, dict) else None
    _check({"body": body}, limits)  # TorchServe hands a JSON body to the handler parsed, under "body"
    return Submission(json.dumps(body).encode(), "application/json", fingerprint, _response_kind(response),
                      webhook or None, _webhook_events(events))


def _as_torchserve_reads(value):
    """A multipart field as TorchServe hands it to the handler: a part sent as application/json parsed (as it
    was sent on: a file part keeps its content type, a plain field has none), anything else as bytes."""
    if isinstance(value, tuple):
        _, data, content_type = value
        if (content_type or "").split(";")[0].strip().lower() == "application/json":
            try:
                return json.loads(data)
            except (ValueError, RecursionError):  # TorchServe hands it on as bytes then
                return data
        return data
    return value.encode() if isinstance(value, str) else value


def _check(row: dict, limits: ServerLimits) -> None:
    refused = refusal(row, limits)
    if refused is not None:
        raise SubmitError.of(refused)


def _response_kind(value) -> str:
    return "json" if value == "json" else "image"  # anything else the handler refuses, or it is the default


def _json_object(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _comma_or_json_list(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return [name.strip() for name in text.split(",") if name.strip()]


def _webhook_events(value) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_WEBHOOK_EVENTS
    if not isinstance(value, list) or not all(isinstance(name, str) and name in EVENTS for name in value):
        raise SubmitError(400, "ParamError", f"webhook_events must be a list of event names out of "
                                             f"{', '.join(EVENTS)}", "webhook_events")
    return tuple(value)
