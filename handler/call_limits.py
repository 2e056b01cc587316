"""What one call of the handler may spend beyond the optimisation, checked before any work: the pixels it
decodes (decoding is work no time budget interrupts), and the bytes of each answer (TorchServe's frontend drops
the worker's connection, and restarts it, for an answer over max_response_size).

Apart from style_transfer_handler.py because TorchServe 0.12 takes the handler module's one class as its entry
point.
"""

import math

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
