"""Progress of a `stream=true` request, sent as JSON lines while the optimisation runs (docs/api.md).

Each line is one chunk of TorchServe's streaming response (HTTP chunked transfer; one message each on gRPC
StreamPredictions): `{"event": "progress", ...}` lines at most every PROGRESS_INTERVAL seconds, then one
`{"event": "done", ...}` line that the handler returns. Every chunk also restarts TorchServe's
responseTimeout clock, which therefore bounds the gap between chunks rather than the whole request.
"""

import base64
import json
import time

from ts.handler_utils.utils import send_intermediate_predict_response

from style_engine.codec import encode_image
from style_engine.optimize import Progress
from style_engine.resize import fit_longer_side, resize

CONTENT_TYPE = "application/x-ndjson"
PROGRESS_INTERVAL = 0.5  # s: often enough for a smooth progress bar, rare enough to cost nothing
PREVIEW_INTERVAL = 3.0  # s between preview images (preview=true)
PREVIEW_SIZE = 128  # px, longer side of a preview


def json_line(event: dict) -> str:
    return json.dumps(event) + "\n"


class ProgressStream:
    """The progress callback of one request of a batch: sends a chunk when PROGRESS_INTERVAL has passed."""

    def __init__(self, context, index: int, preview: bool):
        self.context, self.index, self.preview = context, index, preview
        self.last_sent = self.last_preview = -float("inf")
        self.started = False  # once a chunk has gone out, the status and content type can no longer change

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.last_sent < PROGRESS_INTERVAL:
            return
        event = {"event": "progress", "step": progress.step, "steps": progress.steps, "scale": progress.scale,
                 "scales": progress.scales, "loss": progress.loss, "seconds": round(progress.seconds, 3)}
        if self.preview and now - self.last_preview >= PREVIEW_INTERVAL:
            small = resize(progress.image, fit_longer_side(*progress.image.shape[-2:], PREVIEW_SIZE))
            event["preview"] = base64.b64encode(encode_image(small, "jpeg", 80)).decode("ascii")
            self.last_preview = now
        self.send(json_line(event))
        self.last_sent = now

    def send(self, chunk: str) -> None:
        self.context.set_response_content_type(self.index, CONTENT_TYPE)
        request_id = self.context.request_ids[self.index]
        send_intermediate_predict_response({self.index: chunk}, {self.index: request_id}, "Intermediate response",
                                           200, self.context)
        self.started = True
