"""A submitted job's body -> the request stored for TorchServe, and what the job's own fields ask for.

The body is the predictions endpoint's (docs/api.md), multipart or JSON, passed on with its images and
parameters untouched except: `stream` is set to true (the progress is what the events are made of, and every
chunk keeps the connection alive), and the jobs' own fields `webhook` and `webhook_events` are taken out (only
as fields of their own: inside `params` they are unknown parameters, as for the predictions endpoint). What is
passed on is checked here as the handler will read it (checks.py): what it would refuse before any work is
refused at submit with its error.

Memory: a multipart body is never held whole. Its parts are written to the object store as they arrive, hashed
on the way (the fingerprint that Idempotency-Key and PUT compare); only the fields and the first HEAD_BYTES of
each image, what the checks read, are kept. A JSON body (its images are base64 inside one document) is read
whole. Each submit holds a share of the replica's upload memory (MemoryBudget) while it is read: past that,
submits wait for their turn, and answer 503 Busy when none comes in time.

The previous release hashed a multipart body in a form that puts each part's length before its bytes, which a
stream cannot: a submit that meets a job moved from that release (upgrade.py) makes that form afterwards, from
what it kept and the request it stored (previous_release_fingerprint).
"""

import asyncio
import codecs
import collections
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import AsyncIterator

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from urllib3.fields import RequestField

from .checks import ServerLimits, refusal
from .objects import PART_BYTES, JobObjects, ObjectStore
from .segments import CHECKPOINT
from .store import EVENTS

JOB_FIELDS = ("webhook", "webhook_events")
DEFAULT_WEBHOOK_EVENTS = ("done", "error", "canceled")
IMAGE_PART = re.compile(r"content|init_image|style(_\d+)?|mask_\d+")  # handler/request_parsing.py's images
# Far above what a request holds (images, masks, one part per parameter), far below what a body of the size
# limit could hold as empty parts, each of which costs memory here and in the store.
MAX_PARTS = 256
HEAD_BYTES = 256 * 1024  # of each image, kept for the checks: its header (the size it declares) is in it
KEPT_BYTES = 2 * 1024 * 1024  # the fields and the images' heads together
# What a multipart submit holds at most while it is read, and what it keeps: a part of its upload as its chunks
# come, joined, and as the object store's client sends it (with the copies it makes on the way). Measured
# (tests/test_jobs_scale.py): about 28 MB of the process's resident memory per 20 MB submit.
MULTIPART_MEMORY = 5 * PART_BYTES + KEPT_BYTES + 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
BUDGET_WAIT_SECONDS = 30.0
BUSY_RETRY_AFTER_SECONDS = 5


class SubmitError(Exception):
    def __init__(self, code: int, type_: str, message: str, field: str | None, headers: dict | None = None):
        super().__init__(message)
        self.body = {"code": code, "type": type_, "message": message, "field": field}
        self.headers = headers

    @classmethod
    def of(cls, body: dict) -> "SubmitError":
        return cls(body["code"], body["type"], body["message"], body["field"])


def too_large(max_bytes: int) -> SubmitError:
    return SubmitError(413, "TooLarge", f"the request is larger than the {max_bytes} bytes allowed", "body")


class MemoryBudget:
    """Bytes a replica's submits may hold in memory at once; each takes its share while it is read."""

    def __init__(self, total: int):
        self.total, self.free = total, total
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, wanted: int, timeout: float = BUDGET_WAIT_SECONDS):
        wanted = min(wanted, self.total)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= wanted), timeout)
            except TimeoutError:
                raise SubmitError(503, "Busy", f"the service is reading as many submits as its memory allows; "
                                               f"send the request again in {BUSY_RETRY_AFTER_SECONDS} s", None,
                                  {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}) from None
            self.free -= wanted
        try:
            yield
        finally:
            async with self._changed:
                self.free += wanted
                self._changed.notify_all()


@dataclass(frozen=True)
class Submission:
    size: int  # of the request stored for TorchServe
    content_type: str
    fingerprint: str
    response: str  # "image" or "json"
    webhook: str | None
    webhook_events: tuple[str, ...]
    # How the previous release's fingerprint of a multipart submit is made: bytes, and (start, end) of the stored
    # request, in turn. None for JSON, whose fingerprint that release made as this one does.
    previous_form: tuple | None = None


async def store_submission(request: web.Request, max_bytes: int, limits: ServerLimits, objects: ObjectStore,
                           job: JobObjects, budget: MemoryBudget) -> Submission:
    """The submission, its request written to `job`'s "request" object; or SubmitError with what the
    predictions endpoint (or the jobs service) refuses (the caller deletes what was written)."""
    kind = request.content_type
    if kind not in ("multipart/form-data", "application/json"):
        raise SubmitError(400, "UnsupportedMediaType", "send the predictions endpoint's body: multipart/form-data "
                                                       "or application/json", "Content-Type")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    if kind == "multipart/form-data":
        async with budget.hold(MULTIPART_MEMORY):
            return await _from_multipart(request, max_bytes, limits, objects, job)
    async with budget.hold(2 * (request.content_length or max_bytes)):
        return await _from_json(request, limits, objects, job)


@dataclass
class _Multipart:
    """What reading a multipart body keeps: the fields and image heads the checks read, and the fingerprint."""
    max_bytes: int
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    row: dict = field(default_factory=dict)  # part name -> (filename, kept bytes, content type)
    cut: set = field(default_factory=set)  # image parts kept only in part
    kept: int = 0
    previous_form: list = field(default_factory=list)  # Submission.previous_form
    written: int = 0  # bytes of the stored request made so far


async def _from_multipart(request: web.Request, max_bytes: int, limits: ServerLimits, objects: ObjectStore,
                          job: JobObjects) -> Submission:
    reading = _Multipart(max_bytes)
    boundary = f"style-jobs-{job.prefix.split('/')[-2]}"
    size = await objects.put(job.key("request"), _encoded_parts(request, reading, boundary))
    texts = {name: data.decode("utf-8", "replace") for name, (_, data, _) in reading.row.items()
             if name in (*JOB_FIELDS, "params", "response")}
    row = {name: _as_torchserve_reads(filename, data, content_type)
           for name, (filename, data, content_type) in reading.row.items() if name not in JOB_FIELDS}
    row["stream"] = b"true"  # a plain field wins over params' own (handler/request_parsing.py)
    _check(row, limits, reading.cut)
    params = _json_object(texts.get("params"))
    response = texts.get("response") or params.get("response")
    events = texts.get("webhook_events")
    return Submission(size, f"multipart/form-data; boundary={boundary}", reading.digest.hexdigest(),
                      _response_kind(response), texts.get("webhook") or None,
                      _webhook_events(_comma_or_json_list(events) if events is not None else None),
                      tuple(reading.previous_form))


async def _encoded_parts(request: web.Request, reading: _Multipart, boundary: str) -> AsyncIterator[bytes]:
    """The body sent on to TorchServe, part by part as the client's body is read: every part but the jobs'
    own fields and `stream`, then stream=true. Not aiohttp's request.post(), which holds the body and decodes
    a part without a file name as text (failing on an image sent that way, which TorchServe takes)."""
    parts = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            # Checked at every part too: empty parts never reach the chunk loop below.
            if request.content.total_bytes > reading.max_bytes:
                raise too_large(reading.max_bytes)
            if parts == MAX_PARTS:
                raise SubmitError(400, "ParamError", f"more than {MAX_PARTS} parts: send the images and at most "
                                                     f"one part per parameter", "body")
            if not isinstance(part, BodyPartReader):
                raise SubmitError(400, "ParamError", "a part holds another multipart body: send each image and "
                                                     "field as a part of its own", "body")
            if not part.name:  # TorchServe's decoder would refuse the body with a 500 (openapi.yaml)
                raise SubmitError(400, "ParamError", "a part has no name: every part needs Content-Disposition: "
                                                     "form-data; name=\"...\"", "body")
            parts += 1
            async for chunk in _part(request, part, reading, boundary):
                reading.written += len(chunk)
                yield chunk
    except (ValueError, HttpProcessingError) as error:  # no boundary, a broken body, unreadable part headers
        raise SubmitError(400, "ParamError", f"the multipart body cannot be read: {error}", "body") from None
    yield _part_head(boundary, "stream", None, None) + b"true\r\n" + f"--{boundary}--\r\n".encode()


async def _part(request: web.Request, part: BodyPartReader, reading: _Multipart,
                boundary: str) -> AsyncIterator[bytes]:
    """One part: hashed, its head kept, passed on unless it is one of the jobs' fields (or `stream`)."""
    name, filename, content_type = part.name, part.filename, part.headers.get(hdrs.CONTENT_TYPE)
    passed_on = name not in JOB_FIELDS and name != "stream"
    keeps = HEAD_BYTES if IMAGE_PART.fullmatch(name) else reading.max_bytes
    reading.digest.update(f"{name}\0{'text' if filename is None else 'file'}\0".encode())
    if passed_on:
        # a part with a file name of "" is still a file: TorchServe's decoder needs one
        yield _part_head(boundary, name, None if filename is None else filename or name,
                         None if filename is None else content_type)
    start = reading.written
    kept, size = bytearray(), 0
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape") if filename is None else None
    characters = 0  # of a text part, as the previous release counted them
    while chunk := await part.read_chunk(READ_CHUNK_BYTES):
        if request.content.total_bytes > reading.max_bytes:
            raise too_large(reading.max_bytes)
        reading.digest.update(chunk)
        size += len(chunk)
        characters += len(text.decode(chunk)) if text else 0
        if len(kept) < keeps:
            kept += chunk[:keeps - len(kept)]
            if reading.kept + len(kept) > KEPT_BYTES:
                raise SubmitError(413, "TooLarge", f"the fields and the images' first {HEAD_BYTES} bytes come to "
                                                   f"more than {KEPT_BYTES} bytes: send fewer or smaller fields",
                                  "body")
        if passed_on:
            yield chunk
    reading.digest.update(f"\0{size}\0".encode())
    length = size if text is None else characters + len(text.decode(b"", final=True))
    head = f"{name}\0{'file' if text is None else 'text'}\0{length}\0".encode("utf-8", "surrogateescape")
    reading.previous_form += [head, (start, reading.written) if passed_on else bytes(kept)]
    reading.kept += len(kept)
    if size > len(kept):
        reading.cut.add(name)
    reading.row[name] = (filename, bytes(kept), content_type)
    if passed_on:
        yield b"\r\n"


def _part_head(boundary: str, name: str, filename: str | None, content_type: str | None) -> bytes:
    field = RequestField(name, b"", filename=filename)
    field.make_multipart(content_type=content_type)
    return f"--{boundary}\r\n".encode() + field.render_headers().encode()


async def _from_json(request: web.Request, limits: ServerLimits, objects: ObjectStore,
                     job: JobObjects) -> Submission:
    raw = await request.read()  # aiohttp's client_max_size bounds it (413)
    try:
        body = json.loads(raw)
    except ValueError:
        raise SubmitError(400, "ParamError", "the body is not valid JSON", "body") from None
    del raw
    if not isinstance(body, dict):
        raise SubmitError(400, "ParamError", "the JSON body must be an object", "body")
    digest = hashlib.sha256()
    for chunk in json.JSONEncoder(sort_keys=True).iterencode(body):
        digest.update(chunk.encode())
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
    webhook_events = _webhook_events(events)

    async def encoded() -> AsyncIterator[bytes]:
        for chunk in json.JSONEncoder().iterencode(body):
            yield chunk.encode()

    size = await objects.put(job.key("request"), encoded())
    return Submission(size, "application/json", digest.hexdigest(), _response_kind(response), webhook or None,
                      webhook_events)


def _as_torchserve_reads(filename: str | None, data: bytes, content_type: str | None):
    """A multipart field as TorchServe hands it to the handler: a file part sent as application/json parsed (a
    plain field has no content type passed on), anything else as bytes."""
    if filename is not None and (content_type or "").split(";")[0].strip().lower() == "application/json":
        try:
            return json.loads(data)
        except (ValueError, RecursionError):  # TorchServe hands it on as bytes then
            return data
    return data


def _check(row: dict, limits: ServerLimits, cut: set[str] = frozenset()) -> None:
    if CHECKPOINT in row or CHECKPOINT in (row.get("body") if isinstance(row.get("body"), dict) else {}):
        raise SubmitError(400, "ParamError", "checkpoint is the jobs service's own: it resumes a job's segments "
                                             "from their checkpoints itself; submit the request without it",
                          CHECKPOINT)
    refused = refusal(row, limits)
    # An image kept only in part may be refused for its cut (a TIFF whose header lies at its end): the run,
    # which reads it whole, decides. What its header declares is read all the same (413).
    if refused is not None and not (refused["field"] in cut and refused["code"] == 400):
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


async def previous_release_fingerprint(submission: Submission, objects: ObjectStore, request_key: str) -> str:
    """The fingerprint the previous release would have made of this submission (to compare with a job moved
    from it): of a multipart body, each part's name, kind and length, then its bytes, read again from the stored
    request (`request_key`) where it was not kept."""
    if submission.previous_form is None:
        return submission.fingerprint
    digest, form, position = hashlib.sha256(), collections.deque(submission.previous_form), 0
    async with objects.read(request_key) as stored:
        async for chunk in stored:
            ends = position + len(chunk)
            while form and (isinstance(form[0], bytes) or form[0][0] < ends):
                if isinstance(form[0], bytes):
                    digest.update(form.popleft())
                    continue
                start, end = form[0]
                digest.update(chunk[max(start - position, 0):min(end, ends) - position])
                if end > ends:
                    break
                form.popleft()
            position = ends
    for item in form:  # bytes, or empty parts at the very end
        digest.update(item if isinstance(item, bytes) else b"")
    return digest.hexdigest()
