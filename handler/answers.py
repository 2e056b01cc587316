"""A request's answer: its body, content type and X-Style-* headers, and the most bytes it can take, known
before any work: TorchServe's frontend drops the worker's connection, and restarts it, for an answer over
max_response_size, so a request whose answer could be larger is refused (413) instead."""

import base64
import json
import math
from dataclasses import replace
from typing import NamedTuple

from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from streaming import PREVIEW_SIZE, json_line
from style_engine.api import result_fields
from style_engine.codec import encode_image, encoded_bytes_bound
from style_engine.errors import TooLargeError
from style_engine.optimize import StyleResult
from style_engine.params import OutputParams
from style_engine.resize import fit_longer_side
from style_engine.targets import StyleJob, output_size

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ANSWER_FIELDS_BYTES = 4096  # the JSON fields beside the image (format, sizes, losses...): a few hundred bytes


CHECKPOINT_PIECE_BYTES = 8 * 2**20  # a segment's checkpoint goes out in stream lines of this much (before base64)


class Answer(NamedTuple):
    content_type: str
    body: str | bytes
    headers: dict[str, str]
    leading: tuple[str, ...] = ()  # stream lines to send before the body (a segment's checkpoint)


def encode_answer(result: StyleResult, output: OutputParams, weights_note: str | None, limit: int) -> Answer:
    """The answer of an optimisation: the image in the asked format as the body, in a JSON object or as a stream's
    last line; `weights_note` goes into X-Style-Weights. RuntimeError if it is over `limit` bytes after all
    (answer_bytes_bound was wrong): never an answer that would make TorchServe drop the worker. A suspended
    segment's answer (always streamed) is its checkpoint instead (segment_answer)."""
    if result.checkpoint is not None:
        return segment_answer(result)
    image = encode_image(result.image, output.format, output.quality)
    headers = {"X-Style-Steps": str(result.steps), "X-Style-Seconds": f"{result.seconds:.3f}",
               "X-Style-Loss": f"{result.final_loss['total']:.6g}", "X-Style-Stop-Reason": result.stop_reason,
               "X-Style-Precision": result.precision}
    if weights_note:
        headers["X-Style-Weights"] = weights_note
    fields = {"image": base64.b64encode(image).decode("ascii"), **result_fields(result, output.format)}
    if output.stream:
        content_type, body = STREAM_CONTENT_TYPE, json_line({"event": "done", **fields})
    elif output.response == "json":
        content_type, body = "application/json", json.dumps(fields)
    else:
        content_type, body = CONTENT_TYPES[output.format], image
    if len(body) > limit:
        raise RuntimeError(f"the answer has {len(body)} bytes, over max_response_size ({limit}); "
                           f"answer_bytes_bound said at most {answer_bytes_bound(*result.image.shape[-2:], output)}")
    return Answer(content_type, body, headers)


def segment_answer(result: StyleResult) -> Answer:
    """A segment that ended with iterations left: its checkpoint in `checkpoint` lines of base64 pieces, then a
    `segment` line saying where the run stands (as a progress line would) and how many bytes the pieces make."""
    checkpoint = result.checkpoint
    data = checkpoint.encode()
    pieces = tuple(json_line({"event": "checkpoint", "data": base64.b64encode(data[at:at + CHECKPOINT_PIECE_BYTES])
                              .decode("ascii")}) for at in range(0, len(data), CHECKPOINT_PIECE_BYTES))
    last = {"event": "segment", "step": checkpoint.steps, "scale": checkpoint.scale + 1,
            "scales": checkpoint.scales, "loss": checkpoint.loss, "seconds": round(checkpoint.seconds, 3),
            "checkpoint_bytes": len(data)}
    headers = {"X-Style-Segment": f"{checkpoint.steps} steps done"}
    return Answer(STREAM_CONTENT_TYPE, json_line(last), headers, pieces)


def check_answer_size(job: StyleJob, output: OutputParams, limit: int) -> None:
    """Refuse (413) a request whose answer could be larger than `limit` (TorchServe's max_response_size). Names
    `format` where another format fits at this size, else `size` and the largest that fits."""
    bound = answer_bytes_bound(*output_size(job), output)
    if bound <= limit:
        return
    others = [fmt for fmt in CONTENT_TYPES if answer_bytes_bound(*output_size(job), replace(output, format=fmt))
              <= limit]
    largest = next((size for size in range(job.params.size - 1, 0, -1)
                    if answer_bytes_bound(*_resized_output(job, size), output) <= limit), 0)
    what = f"format {' or '.join(others)} fits" if others else f"size at most {largest} fits"
    raise TooLargeError("format" if others else "size",
                        f"a {output.format} answer{' in JSON (base64)' if bound_is_text(output) else ''} of "
                        f"{'x'.join(map(str, output_size(job)[::-1]))} px can take up to {bound} bytes, over this "
                        f"server's max_response_size of {limit} bytes: {what}")


def _resized_output(job: StyleJob, size: int) -> tuple[int, int]:
    return fit_longer_side(*job.content.shape[-2:], size)


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
