"""One run of a job: its request sent to TorchServe's streaming REST API, the answer read as it comes.

TorchServe applies everything it applies to any request (batching, the time cap, memory admission, metrics).
The answer is a stream of JSON lines (stream=true): progress lines, then `done` with the image, or `error`.
Its status line and first line come when a worker has taken the request: that is when TorchServe has accepted
it (the job is `running` from then on; before, it waits in TorchServe's queue and stays `queued`).
What can go wrong is sorted into what the caller does about it:
  Done         the result
  Suspended    a segment's end with iterations left: its checkpoint, for the next segment to resume from
  Refused      the request's own error (bad input, too large, out of memory): the job fails with it
  Busy         TorchServe cannot take it now (its queue is full, no worker is up, it is not reachable): wait
               (at least its Retry-After) and send it again; this does not count as an attempt
  Interrupted  the run broke off (the worker died, the stream was cut, the device failed): another attempt
No time limit here: the caller's deadline (the job's) cancels the call.
"""

import base64
import json
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable

import aiohttp

from .auth import TorchServeCredentials

MODEL = "style_transfer"
STREAM_TYPE = "application/x-ndjson"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TOKEN_REFUSED = "Token Authorization failed"  # TorchServe 0.12's message for a wrong or expired key
# 503s that refuse a request before any work, to be sent again later: TorchServe's own (its queue is full, no
# worker is up yet) and the handler's (Busy: the worker's call had no time left; Expired: it waited in the
# queue longer than a proxy between here and TorchServe waits, such as the pod's auth proxy).
BUSY_TYPES = ("ServiceUnavailableException", "Busy", "Expired")
# A proxy's own 504 comes before any line of the stream: the request was still waiting in TorchServe's queue,
# where the handler drops it unseen (Expired). Sent again like a 503, bounded by the job's own timeout.
QUEUE_TIMEOUT = 504
# Only connecting is bounded here: a request may wait long in TorchServe's queue before its first line, and the
# job's own deadline (worker.py) bounds the whole run.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)
DESCRIBE_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Done:
    fields: dict  # the done line: image (base64) and the response=json fields


@dataclass(frozen=True)
class Suspended:
    fields: dict  # the segment line: step, scale, scales, loss, seconds, checkpoint_bytes
    checkpoint: bytes


@dataclass(frozen=True)
class Refused:
    error: dict  # the API's error body (docs/api.md)


@dataclass(frozen=True)
class Busy:
    reason: str
    retry_after: float | None = None  # s, from TorchServe's (or the handler's) Retry-After


@dataclass(frozen=True)
class Interrupted:
    error: dict


Outcome = Done | Suspended | Refused | Busy | Interrupted


class TorchServeClient:
    def __init__(self, url: str, management_url: str, credentials: TorchServeCredentials):
        self.url = f"{url.rstrip('/')}/predictions/{MODEL}"
        self.describe_url = f"{management_url.rstrip('/')}/models/{MODEL}?customized=true"
        self.credentials = credentials
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # no pool limit of its own: the worker's concurrency bounds the requests in flight
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def run(self, body: AsyncIterable[bytes], size: int, content_type: str, run_key: str,
                  on_accepted: Callable[[], Awaitable[None]],
                  on_progress: Callable[[dict], Awaitable[None]], segment_seconds: float) -> Outcome:
        """Send the request, `size` bytes read from `body` as they are sent, with X-Style-Job-Id: `run_key`
        (whose cancel key stops it in the worker), as a segment that ends after `segment_seconds`."""
        headers = {**await self.credentials.header(self.session), "Content-Type": content_type,
                   "Content-Length": str(size), "X-Style-Job-Id": run_key,
                   "X-Style-Segment-Seconds": f"{segment_seconds:g}"}
        try:
            async with self.session.post(self.url, data=body, headers=headers, timeout=TIMEOUT) as response:
                if response.status != 200:
                    return _sorted_error(response.status, await response.read(), response.headers)
                if response.content_type != STREAM_TYPE:
                    return Interrupted(_error(502, "BadGateway", f"TorchServe answered {response.content_type}, "
                                                                 f"not a stream", None))
                await on_accepted()
                return await _read_stream(response, on_progress)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            return Busy(f"TorchServe is not reachable: {error!r}")
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            return Interrupted(_error(502, "WorkerLost", f"the connection to TorchServe broke off: {error}", None))

    async def describe(self) -> dict:
        """The handler's description of the model (presets, parameters, limits): TorchServe's describe call on
        its management API, or on the cluster's auth proxy, which passes that one call on."""
        headers = await self.credentials.header(self.session, "management")
        async with self.session.get(self.describe_url, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=DESCRIBE_TIMEOUT_SECONDS)) as response:
            response.raise_for_status()
            return (await response.json())[0]["customizedMetadata"]


async def _read_stream(response: aiohttp.ClientResponse, on_progress) -> Outcome:
    """Lines may be megabytes (the done line holds the image): split them here rather than with readline's
    size limit."""
    pending, checkpoint = b"", []
    async for chunk in response.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("event") == "progress":
                await on_progress(event)
            elif event.get("event") == "checkpoint":
                checkpoint.append(base64.b64decode(event["data"]))
            elif event.get("event") == "segment":
                data = b"".join(checkpoint)
                if len(data) != event.get("checkpoint_bytes"):
                    break  # a stream cut between pieces: the segment is lost, as a run that broke off
                return Suspended(event, data)
            elif event.get("event") == "done":
                return Done(event)
            elif event.get("event") == "error":
                return _sorted_error(event.get("code", 500), json.dumps(
                    {key: event.get(key) for key in ("code", "type", "message", "field")}).encode())
    return Interrupted(_error(502, "WorkerLost", "TorchServe's stream ended without a result: its worker stopped "
                                                 "mid-run", None))


def _sorted_error(status: int, raw: bytes, headers=None) -> Outcome:
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    error = _error(status, body.get("type") or "TorchServeError", body.get("message") or raw[:500].decode(
        "utf-8", "replace"), body.get("field"))
    if status == 503 and error["type"] in BUSY_TYPES:
        return Busy(error["message"], _retry_after(headers))
    if status == QUEUE_TIMEOUT:
        return Busy(f"a proxy in front of TorchServe gave up waiting for the first line ({error['message'][:200]})",
                    _retry_after(headers))
    if TOKEN_REFUSED in error["message"]:
        return Interrupted(_error(502, "TorchServeAuthFailed", "TorchServe refused the jobs service's key", None))
    if status == 507 and error["type"] == "InternalServerException":
        return Interrupted(_error(502, "WorkerLost", f"TorchServe's worker died mid-run ({error['message']})", None))
    if status >= 500 and status != 507:  # 507 with our own type is the request's memory: refused
        return Interrupted(error)
    return Refused(error)


def _retry_after(headers) -> float | None:
    """Retry-After in seconds (the date form is not used by TorchServe or the handler)."""
    try:
        return max(0.0, float((headers or {}).get("Retry-After", "")))
    except ValueError:
        return None


def _error(code: int, type_: str, message: str, field: str | None) -> dict:
    return {"code": code, "type": type_, "message": message, "field": field}


RESULT_CHUNK_CHARS = 4 * 256 * 1024  # base64 decoded a whole number of 4-character groups at a time


def result_headers(done: dict) -> dict:
    """The X-Style-* headers the predictions endpoint gives with the same request's answer."""
    return {"X-Style-Steps": str(done.get("steps")), "X-Style-Seconds": f"{done.get('seconds', 0):.3f}",
            "X-Style-Loss": f"{done['loss']['final']['total']:.6g}",
            "X-Style-Stop-Reason": str(done.get("stop_reason")), "X-Style-Precision": str(done.get("precision"))}


def result_type(done: dict, response: str) -> str:
    return "application/json" if response == "json" else CONTENT_TYPES.get(done.get("format"), "image/png")


async def result_chunks(done: dict, response: str) -> AsyncIterator[bytes]:
    """What GET /jobs/{id}/result returns, as the predictions endpoint answers the same request without stream:
    the response=json fields, or the image, made a piece at a time."""
    if response == "json":
        for chunk in json.JSONEncoder().iterencode({key: value for key, value in done.items() if key != "event"}):
            yield chunk.encode()
        return
    image = done["image"]
    for start in range(0, len(image), RESULT_CHUNK_CHARS):
        yield base64.b64decode(image[start:start + RESULT_CHUNK_CHARS])


def done_event(done: dict, job_id: str) -> dict:
    """The `done` event: the response=json fields without the image, and where the result is."""
    return {**{key: value for key, value in done.items() if key not in ("event", "image")},
            "result": f"/jobs/{job_id}/result"}
