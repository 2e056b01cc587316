"""What one call of the handler may spend beyond the optimisation, checked before any work: the pixels it
decodes (decoding is work no time budget interrupts), the bytes of each answer (TorchServe's frontend drops
the worker's connection, and restarts it, for an answer over max_response_size), and the time each request's
client still waits (ClientWait).

Apart from style_transfer_handler.py because TorchServe 0.12 takes the handler module's one class as its entry
point.
"""

import math
import re
from dataclasses import dataclass
from typing import Mapping

from style_engine.codec import encoded_bytes_bound
from style_engine.errors import TooLargeError
from streaming import PREVIEW_SIZE
from style_engine.params import OutputParams


class NoTimeLeft(Exception):
    """A request this call has no time left for: answered 503 with Retry-After, not the client's fault."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecodingBudget:
    """The pixels one call of the handler may still decode (handler.max_decoded_pixels_per_call): decoding is
    work that no time budget interrupts."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def take(self, pixels: int) -> None:
        """Take a request's declared pixels; TooLargeError (413) if it alone is over the limit, NoTimeLeft
        (503) if the requests before it in this call have used what it needs."""
        if pixels > self.limit:
            raise TooLargeError("content", f"the images of this request declare {pixels} pixels together; at most "
                                           f"{self.limit} are decoded for one request: send smaller images")
        if pixels > self.left:
            raise NoTimeLeft("the requests that arrived with this one have used what this call may decode")
        self.left -= pixels


# Set by the proxy nearest TorchServe (deploy/nginx.conf's hops, deploy/k8s/auth-proxy.yaml), replacing whatever
# a client sent: when the request reached it, "t=<seconds since the epoch>" ($msec: the Heroku and New Relic
# convention, which also allows milliseconds and microseconds), and how long it waits for the answer, in
# milliseconds (its proxy_read_timeout; Envoy's x-envoy-expected-rq-timeout-ms says the same).
REQUEST_START_HEADER = "x-request-start"
REQUEST_TIMEOUT_HEADER = "x-request-timeout-ms"
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{1,9})?")
_EPOCH_UNITS = ((1e15, 1e-6), (1e12, 1e-3), (0, 1.0))  # from the value's magnitude: microseconds, ms, seconds


@dataclass(frozen=True)
class ClientWait:
    """How long the client of a request waits for its answer, as the proxy nearest TorchServe declares it. The
    proxy runs on the worker's host (the local cluster's hops) or in its pod (the auth proxy): one clock."""
    arrived: float  # when the request reached the proxy, seconds since the epoch
    timeout: float  # how long the proxy waits for the answer, seconds

    @classmethod
    def from_headers(cls, headers: Mapping) -> "ClientWait | None":
        """From a request's headers (any case); None when either header is missing or malformed: such a request
        (a direct client on loopback, the management API's describe call) is not checked."""
        values = {name.lower(): value for name, value in headers.items() if isinstance(name, str)}
        arrived = _epoch_seconds(values.get(REQUEST_START_HEADER))
        timeout_ms = _number(values.get(REQUEST_TIMEOUT_HEADER))
        if arrived is None or not timeout_ms:
            return None
        return cls(arrived, timeout_ms / 1000)

    def waited(self, now: float) -> float:
        return now - self.arrived

    def left(self, now: float) -> float:
        """Seconds until the proxy gives up on the answer (`now` in seconds since the epoch); negative: gone."""
        return self.arrived + self.timeout - now


def _number(value) -> float | None:
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else None


def _epoch_seconds(value) -> float | None:
    if not isinstance(value, str):
        return None
    number = _number(value.strip().removeprefix("t="))
    if not number:
        return None
    return next(number * scale for at_least, scale in _EPOCH_UNITS if number >= at_least)


def expired_message(wait: ClientWait, now: float) -> str:
    """Why a request that outwaited its client is dropped (503 Expired)."""
    return (f"this request waited {wait.waited(now):.1f} s for a worker, longer than its client waits "
            f"({wait.timeout:g} s, the proxy's X-Request-Timeout-Ms): it was dropped before any work; send it again "
            f"when the server is less busy (Retry-After)")


ANSWER_FIELDS_BYTES = 4096  # the JSON fields beside the image (format, sizes, losses...): a few hundred bytes


def bound_is_text(output: OutputParams) -> bool:
    """Whether the answer carries the image as base64 text: a JSON object, or a stream's last line."""
    return output.stream or output.response == "json"


def answer_bytes_bound(height: int, width: int, output: OutputParams) -> int:
    """The most bytes one answer (or, streamed, one chunk of it) of an output of height x width can take."""
    image = encoded_bytes_bound(height, width, output.format)
    if not bound_is_text(output):
        return image
    chunk = _base64_bytes(image) + ANSWER_FIELDS_BYTES
    if output.stream and output.preview:  # a progress line with a preview
        chunk = max(chunk, _base64_bytes(encoded_bytes_bound(PREVIEW_SIZE, PREVIEW_SIZE, "jpeg")) + ANSWER_FIELDS_BYTES)
    return chunk


def _base64_bytes(data_bytes: int) -> int:
    return 4 * math.ceil(data_bytes / 3)
