"""A submitted job's body -> what is sent to TorchServe, and what the job's own fields ask for.

The body is the predictions endpoint's (CONTRACT.md "Request"), multipart or JSON, passed on with its images and
parameters untouched except: `stream` is set to true (the progress is what the events are made of, and every
chunk keeps the connection alive), and the jobs' own fields `webhook` and `webhook_events` are taken out. The
parameters are checked by the worker's handler, as for any request: a bad one ends the job `failed` with the
same error the predictions endpoint gives. What only the jobs service knows is checked here, at submit.
"""

import hashlib
import json
from dataclasses import dataclass

from aiohttp import web
from urllib3 import encode_multipart_formdata

from .store import EVENTS

JOB_FIELDS = ("webhook", "webhook_events")
DEFAULT_WEBHOOK_EVENTS = ("done", "error", "canceled")
TEXT_FIELDS = ("params", "response", *JOB_FIELDS)  # the fields read here


class SubmitError(Exception):
    def __init__(self, code: int, type_: str, message: str, field: str | None):
        super().__init__(message)
        self.body = {"code": code, "type": type_, "message": message, "field": field}


@dataclass(frozen=True)
class Submission:
    body: bytes
    content_type: str
    fingerprint: str
    response: str  # "image" or "json"
    webhook: str | None
    webhook_events: tuple[str, ...]


async def read_submission(request: web.Request) -> Submission:
    kind = request.content_type
    if kind == "multipart/form-data":
        return await _from_multipart(request)
    if kind == "application/json":
        return _from_json(await request.read())
    raise SubmitError(400, "UnsupportedMediaType", "send the predictions endpoint's body: multipart/form-data or "
                                                   "application/json", "Content-Type")


async def _from_multipart(request: web.Request) -> Submission:
    form = await request.post()
    fields, digest, texts = [], hashlib.sha256(), {}
    for name, value in form.items():
        if isinstance(value, web.FileField):
            data = value.file.read()
            digest.update(f"{name}\0file\0{len(data)}\0".encode() + data)
            if name in TEXT_FIELDS:  # clients may send any field as a file part (requests' files= does)
                texts[name] = data.decode("utf-8", "replace")
            if name not in JOB_FIELDS and name != "stream":
                fields.append((name, (value.filename or name, data, value.content_type)))
        else:
            digest.update(f"{name}\0text\0{len(value)}\0{value}".encode())
            texts[name] = value
            if name not in JOB_FIELDS and name != "stream":
                fields.append((name, value))
    if "content" not in form:
        raise SubmitError(400, "ImageError", "the content image is missing: send the file part \"content\"",
                          "content")
    fields.append(("stream", "true"))  # a plain field wins over params' own (handler/request_parsing.py)
    body, content_type = encode_multipart_formdata(fields)
    params = _json_object(texts.get("params"))
    response = texts.get("response") or params.get("response")
    events = texts.get("webhook_events")
    return Submission(body, content_type, digest.hexdigest(), _response_kind(response), texts.get("webhook") or None,
                      _webhook_events(_comma_or_json_list(events) if events is not None else None))


def _from_json(raw: bytes) -> Submission:
    try:
        body = json.loads(raw)
    except ValueError:
        raise SubmitError(400, "ParamError", "the body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise SubmitError(400, "ParamError", "the JSON body must be an object", "body")
    if "content" not in body:
        raise SubmitError(400, "ImageError", "the content image is missing: \"content\": \"<base64>\"", "content")
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
    return Submission(json.dumps(body).encode(), "application/json", fingerprint, _response_kind(response),
                      webhook or None, _webhook_events(events))


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
