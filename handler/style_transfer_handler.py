"""TorchServe handler: parse, validate, run the engine, encode, report. The method lives in style_engine.

Its own `initialize` (not BaseHandler's): the archive holds a weights file rather than a serialized model,
and BaseHandler runs inference under torch.inference_mode(), where no gradient can flow to the image.
Every request in a batch gets its own answer: bad input is that request's 4xx JSON error (CONTRACT.md),
never an exception that would fail the others or the worker.
"""

import base64
import json
import logging
import os

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from request_parsing import parse_request
from server_config import ServerConfig
from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from streaming import ProgressStream, json_line
from style_engine import (ParamError, RequestError, StyleJob, VGGFeatures, batch_key, load_features_state_dict,
                          parse_params)
from style_engine.api import result_fields
from style_engine.codec import decode_image, encode_image
from style_engine.optimize import StyleResult, stylize_batch
from style_engine.params import OutputParams
from style_engine.targets import GramCache, check_job, output_size, shrink_to_need

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RANDOM_WEIGHTS_NOTE = "random: for tests only, the result shows no real style"
OUT_OF_MEMORY = {"code": 507, "type": "OutOfMemory", "field": "size",
                 "message": "the device ran out of memory for this request; try a smaller size or fewer style images"}
INTERNAL_ERROR = {"code": 500, "type": "InternalError", "field": None,
                  "message": "the optimisation failed unexpectedly; the server log has the details"}
CPU_ALLOCATION_FAILED = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
# TorchServe 0.12 gives the handler no way to tell a unary Predictions call from StreamPredictions, and a
# progress chunk sent to a unary call makes it close the call and restart the worker.
GRPC_STREAM_REFUSED = ("stream=true is not available over gRPC: TorchServe 0.12 cannot tell Predictions from "
                       "StreamPredictions and a progress message would end a Predictions call; call without "
                       "stream (both RPCs return the result), or use REST for live progress")


class StyleTransferHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context) -> None:
        _record_worker_start(context)
        properties = context.system_properties
        self.config = ServerConfig.from_model_yaml(context.model_yaml_config)
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu")
        weights_path = os.path.join(properties["model_dir"], self.config.weights_file)
        state_dict = load_features_state_dict(weights_path, self.config.deepest_layer)
        self.extractor = VGGFeatures(state_dict, self.config.deepest_layer).to(self.device)
        self.gram_cache = GramCache(self.config.gram_cache_entries)
        if self.config.random_weights:
            logger.warning("style_transfer: this archive has RANDOM VGG19 weights (%s)", RANDOM_WEIGHTS_NOTE)
        logger.info("style_transfer: VGG19 up to %s on %s", self.config.deepest_layer, self.device)
        self.initialized = True

    def handle(self, data: list[dict], context) -> list:
        responses: list = [None] * len(data)
        prepared: dict[int, tuple[StyleJob, OutputParams]] = {}
        for index, row in enumerate(data):
            try:
                prepared[index] = self._prepare(row, grpc=_is_grpc(context, index))
            except RequestError as error:
                responses[index] = _error(context, index, error.status, error.to_json())
        for indices in _batches(prepared, self.config.max_batch_pixels):
            streams = {item: ProgressStream(context, index, prepared[index][1].preview)
                       for item, index in enumerate(indices) if prepared[index][1].stream}
            results = self._run([prepared[i][0] for i in indices], _dispatch(streams) if streams else None)
            for index, outcome in zip(indices, results):
                output = prepared[index][1]
                if isinstance(outcome, StyleResult):
                    responses[index] = self._respond(context, index, outcome, output)
                else:
                    if outcome["type"] == OUT_OF_MEMORY["type"]:
                        _record_out_of_memory(context, index, stage="run")
                    error = _error(context, index, outcome["code"], outcome)
                    responses[index] = json_line({"event": "error", **outcome}) if output.stream else error
        for index in range(len(data)):
            if _is_grpc(context, index):
                # TorchServe 0.12's gRPC StreamPredictions reads this header without a null check and restarts
                # the worker when a final response lacks it (GRPCJob.response). Not for REST, where "false"
                # on an unstreamed response leaves the client waiting for a chunked end that never comes.
                context.set_response_header(index, "ts_stream_next", "false")
        _raise_for_a_lone_grpc_error(context, responses)
        return responses

    def _prepare(self, row: dict, grpc: bool) -> tuple[StyleJob, OutputParams]:
        """Parse and check one request up to the point where only the optimisation is left."""
        request = parse_request(row, self.config.max_styles)
        style_params, output_params = parse_params(request.params, defaults=self.config.defaults,
                                                   maxima=self.config.maxima)
        if grpc and output_params.stream:
            raise ParamError("stream", GRPC_STREAM_REFUSED)
        limit = self.config.max_image_pixels
        content = decode_image(request.content, "content", max_pixels=limit)
        styles = tuple(decode_image(data, "style" if i == 0 else f"style_{i + 1}", max_pixels=limit)
                       for i, data in enumerate(request.styles))
        job = StyleJob(content, styles, style_params)
        check_job(job, self.extractor)
        return shrink_to_need(job), output_params  # what waits for its batch holds megabytes, not gigabytes

    def _run(self, jobs: list[StyleJob], callback) -> list[StyleResult | dict]:
        """The engine's results, or for every job an error object when the batch could not be run."""
        try:
            return stylize_batch(self.extractor, jobs, callback=callback, gram_cache=self.gram_cache)
        except Exception as error:
            if not _is_out_of_memory(error):  # a bug, not the client's fault: answer 500, keep the worker
                logger.exception("style_transfer: optimisation failed")
                return [INTERNAL_ERROR] * len(jobs)
            logger.error("style_transfer: out of memory for %d request(s): %s", len(jobs), str(error))
        # Only here, after the except block, are the exception and the step's tensors its traceback held gone,
        # so that the allocator's cache can be handed back.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [OUT_OF_MEMORY] * len(jobs)

    def _respond(self, context, index: int, result: StyleResult, output: OutputParams):
        image = encode_image(result.image, output.format, output.quality)
        headers = {"X-Style-Steps": str(result.steps), "X-Style-Seconds": f"{result.seconds:.3f}",
                   "X-Style-Loss": f"{result.final_loss['total']:.6g}", "X-Style-Stop-Reason": result.stop_reason}
        if self.config.random_weights:
            headers["X-Style-Weights"] = RANDOM_WEIGHTS_NOTE
        for name, value in headers.items():
            context.set_response_header(index, name, value)
        _record_metrics(context, index, result)
        if output.stream:
            context.set_response_content_type(index, STREAM_CONTENT_TYPE)
            return json_line({"event": "done", "image": base64.b64encode(image).decode("ascii"),
                              **result_fields(result, output.format)})
        if output.response == "json":
            context.set_response_content_type(index, "application/json")
            return json.dumps({"image": base64.b64encode(image).decode("ascii"),
                               **result_fields(result, output.format)})
        context.set_response_content_type(index, CONTENT_TYPES[output.format])
        return image


def _is_out_of_memory(error: Exception) -> bool:
    """CUDA raises torch.OutOfMemoryError; torch's CPU allocator a RuntimeError that only its message tells."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in CPU_ALLOCATION_FAILED))


def _is_grpc(context, index: int) -> bool:
    """gRPC requests reach the handler with no HTTP header, only the per-parameter content types (dicts)."""
    return not any(isinstance(value, str) for value in context.get_all_request_header(index).values())


def _raise_for_a_lone_grpc_error(context, responses: list) -> None:
    """Give a refused gRPC request a gRPC error status carrying our JSON error as its message.

    TorchServe 0.12 ignores per-request statuses on gRPC (a refused request would come back as OK with the
    error as its prediction); only an exception sets the status, and it sets it for the whole batch. So this
    applies to a batch of one; a gRPC request refused within a larger batch gets the JSON error as its
    prediction (README, "gRPC").
    """
    status = context.get_response_status(0)[0]
    if len(responses) == 1 and _is_grpc(context, 0) and status is not None and status >= 400:
        raise PredictionException(responses[0], status)


def _dispatch(streams: dict[int, ProgressStream]):
    """One progress callback for a batch, passing each image's progress to its request's stream, if any."""

    def callback(progress):
        if progress.item in streams:
            streams[progress.item](progress)

    return callback


def _batches(prepared: dict[int, tuple[StyleJob, OutputParams]], max_pixels: int) -> list[list[int]]:
    """Request indices grouped so that each group can be optimised as one batch: same settings and output
    size, and at most `max_pixels` output pixels together (memory grows with the batch)."""
    groups: dict[tuple, list[int]] = {}
    for index, (job, _) in prepared.items():
        groups.setdefault((batch_key(job.params), output_size(job)), []).append(index)
    batches = []
    for (_, (height, width)), indices in groups.items():
        per_batch = max(1, max_pixels // (height * width))
        batches += [indices[i:i + per_batch] for i in range(0, len(indices), per_batch)]
    return batches


def _error(context, index: int, status: int, body: dict) -> str:
    context.set_response_status(status, body["type"], index)
    context.set_response_content_type(index, "application/json")
    return json.dumps(body)


def _record_metrics(context, index: int, result: StyleResult) -> None:
    """Custom metrics, declared in metrics.yaml and served with TorchServe's own on the metrics port.

    Each call passes a new `dimensions` list: TorchServe 0.12's add_metric defaults it to one shared list
    and appends its default dimensions to it.
    """
    add, counter, gauge = context.metrics.add_metric, MetricTypes.COUNTER, MetricTypes.GAUGE
    add("StyleOptimizationSeconds", result.seconds, "s", index, [], counter)
    add("StyleSteps", result.steps, "count", index, [], counter)
    add("StyleStepsPerSecond", result.steps / max(result.seconds, 1e-9), "per_second", index, [], gauge)
    add("StyleFinalLoss", result.final_loss["total"], "loss", index, [], gauge)
    if result.stop_reason != "steps":
        add("StyleEarlyStops", 1, "count", index, _dimensions(context, StopReason=result.stop_reason), counter)


def _record_out_of_memory(context, index: int, stage: str) -> None:
    """One StyleOutOfMemory count for a request answered 507 OutOfMemory; `stage` says when memory ran out."""
    context.metrics.add_metric("StyleOutOfMemory", 1, "count", index, _dimensions(context, Stage=stage),
                               MetricTypes.COUNTER)


def _record_worker_start(context) -> None:
    """At each worker start, before anything that could fail: count the start, set alerted counters to 0.

    TorchServe 0.12 counts no worker restarts. Its WorkerLoadTime is a gauge set after a successful load, so
    Prometheus would see a restart only as a changed value between two scrapes, missing a failed load, a second
    restart within one scrape interval and a load that took the same milliseconds. The frontend sums
    StyleWorkerStarts over the worker processes it starts, so its increase is the restarts.
    """
    add, counter = context.metrics.add_metric, MetricTypes.COUNTER
    add("StyleWorkerStarts", 1, "count", None, _dimensions(context), counter)
    # Counters whose increase the alert rules watch start at 0: the first sample of a new series is no increase
    # to rate() or increase(), so the first success or out-of-memory answer of a server would go unseen.
    add("StyleOptimizationSeconds", 0, "s", None, _dimensions(context), counter)
    add("StyleOutOfMemory", 0, "count", None, _dimensions(context, Stage="run"), counter)


def _dimensions(context, **extra: str) -> list[Dimension]:
    """A new list each time (see _record_metrics), in metrics.yaml's order: ModelName, Level, then `extra`."""
    return [Dimension("ModelName", context.model_name), Dimension("Level", "Model"),
            *(Dimension(name, value) for name, value in extra.items())]
