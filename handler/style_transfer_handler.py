"""TorchServe handler: parse, validate, run the engine, encode, report. The method lives in style_engine.

Its own `initialize` (not BaseHandler's): the archive holds a weights file rather than a serialized model,
and BaseHandler runs inference under torch.inference_mode(), where no gradient can flow to the image.
Every request in a batch gets its own answer: bad input is that request's 4xx JSON error (CONTRACT.md),
never an exception that would fail the others or the worker. The management API's describe call
(`GET /models/style_transfer?customized=true`) reaches `handle` too, as a request of its own (see
_asks_for_description), and is answered with the model's description.
"""

import base64
import json
import logging
import os
import time

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import create_predict_response
from ts.utils.util import PredictionException

from cancellation import CancelSignals, job_key
from request_parsing import decode_job, parse_request
from server_config import ServerConfig
from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from streaming import ProgressStream, json_line
from style_engine import (NotEnoughMemory, ParamError, RequestError, StyleJob, VGGFeatures, batch_key,
                          load_features_state_dict, parse_params)
from style_engine.api import result_fields
from style_engine.codec import encode_image
from style_engine.memory import admit, fitting_mode, free_bytes
from style_engine.optimize import StyleResult, stylize_batch
from style_engine.params import OutputParams, describe_params
from style_engine.presets import ARCHIVE_DIR, PresetLibrary
from style_engine.targets import GramCache, check_job, output_size, shrink_to_need

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RANDOM_WEIGHTS_NOTE = "random: for tests only, the result shows no real style"
DEVICE_FAILED = {"code": 503, "type": "DeviceFailure", "field": None,
                 "message": "the worker's device failed and cannot recover; a new worker is starting: send the "
                            "request again"}
DEVICE_FAILED_EXIT_STATUS = 3  # a worker that ends on a failed device (TorchServe restarts it)
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
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu")
        self.config = ServerConfig.from_model_yaml(context.model_yaml_config, self.device.type)
        weights_path = os.path.join(properties["model_dir"], self.config.weights_file)
        state_dict = load_features_state_dict(weights_path, self.config.deepest_layer)
        self.extractor = VGGFeatures(state_dict, self.config.deepest_layer).to(self.device)
        self.gram_cache = GramCache(self.config.gram_cache_entries, self.config.preset_gram_cache_entries)
        self.presets = PresetLibrary.load(os.path.join(properties["model_dir"], ARCHIVE_DIR),
                                          self.config.max_image_pixels)
        # after the weights are on the device: what is free then is what requests may use
        self.memory_budget = self.config.memory_budget_bytes or int(
            free_bytes(self.device) * (1 - self.config.memory_margin))
        self.description = json.dumps({
            "presets": self.presets.describe(), "parameters": describe_params(self.config.defaults, self.config.maxima),
            "limits": {**self.config.limits(), "memory_budget_bytes": self.memory_budget},
            "weights": self.config.weights, "device": str(self.device)})
        self.device_failed = False  # set when the device can no longer run work: the worker then ends
        self.cancel_signals = CancelSignals.from_environment()  # jobs canceled through the jobs service
        if self.config.random_weights:
            logger.warning("style_transfer: this archive has RANDOM VGG19 weights (%s)", RANDOM_WEIGHTS_NOTE)
        logger.info("style_transfer: VGG19 up to %s on %s (TorchServe's gpu_id: %s), %.2f GiB for requests",
                    self.config.deepest_layer, self.device, gpu_id, self.memory_budget / 2**30)
        self.initialized = True

    def handle(self, data: list[dict], context) -> list:
        # One deadline for the whole call: TorchServe waits responseTimeout for all of its answers together.
        deadline = time.perf_counter() + self.config.seconds_per_call
        responses: list = [None] * len(data)
        prepared: dict[int, tuple[StyleJob, OutputParams]] = {}
        for index, row in enumerate(data):
            if _asks_for_description(context, index):
                context.set_response_content_type(index, "application/json")
                responses[index] = self.description
                continue
            try:
                prepared[index] = self._prepare(row, grpc=_is_grpc(context, index))
            except RequestError as error:
                if isinstance(error, NotEnoughMemory):
                    _record_out_of_memory(context, index, stage="admission")
                responses[index] = _error(context, index, error.to_json())
                _log_request(context, index, error.status, error=error.to_json())
        groups = _batches(prepared, self._fit_as_they_are)
        for position, indices in enumerate(groups):
            share = _time_share(deadline, [_cost(prepared, group) for group in groups[position:]])
            responses_of_group = self._serve(context, prepared, indices, share)
            for index, response in zip(indices, responses_of_group):
                responses[index] = response
        for index in range(len(data)):
            if _is_grpc(context, index):
                # TorchServe 0.12's gRPC StreamPredictions reads this header without a null check and restarts
                # the worker when a final response lacks it (GRPCJob.response). Not for REST, where "false"
                # on an unstreamed response leaves the client waiting for a chunked end that never comes.
                context.set_response_header(index, "ts_stream_next", "false")
        if self.device_failed:
            _answer_then_exit(context, responses)
        _raise_for_a_lone_grpc_error(context, responses)
        return responses

    def _prepare(self, row: dict, grpc: bool) -> tuple[StyleJob, OutputParams]:
        """Parse and check one request up to the point where only the optimisation is left."""
        request = parse_request(row, self.config.max_styles)
        style_params, output_params = parse_params(request.params, defaults=self.config.defaults,
                                                   maxima=self.config.maxima)
        if grpc and output_params.stream:
            raise ParamError("stream", GRPC_STREAM_REFUSED)
        job = decode_job(request, style_params, self.presets, self.config.max_image_pixels)
        check_job(job, self.extractor, self.config.max_style_pixels, self.config.max_styles)
        job = shrink_to_need(job)  # what waits for its batch holds megabytes, not gigabytes
        admit(job, self.device, self.memory_budget, self.config.save_memory)
        return job, output_params

    def _fit_as_they_are(self, jobs: list[StyleJob]) -> bool:
        """Whether these jobs fit the memory budget optimised together without checkpointing."""
        return fitting_mode(jobs, self.device, self.memory_budget, save_memory=False) is not None

    def _serve(self, context, prepared: dict, indices: list[int], deadline: float) -> list:
        """Optimise one group of requests together; one response (or error) per request, in order."""
        streams = {item: ProgressStream(context, index, prepared[index][1].preview)
                   for item, index in enumerate(indices) if prepared[index][1].stream}
        jobs = [prepared[i][0] for i in indices]
        # a batch is formed only where its jobs fit as they are; a job alone may need checkpointing (admit)
        checkpoint = not self._fit_as_they_are(jobs)
        should_stop = self.cancel_signals.watch([job_key(context.get_all_request_header(i)) for i in indices])
        outcomes = self._run(jobs, _dispatch(streams) if streams else None, deadline, checkpoint,
                             should_stop=should_stop)
        responses = []
        for item, (index, outcome) in enumerate(zip(indices, outcomes)):
            job, output = prepared[index]
            if isinstance(outcome, StyleResult):
                responses.append(self._respond(context, index, outcome, output))
                _log_request(context, index, 200, job, outcome, batch=len(indices), checkpoint=checkpoint)
            else:
                if outcome["type"] == OUT_OF_MEMORY["type"]:
                    _record_out_of_memory(context, index, stage="run")
                responses.append(_failure(context, index, outcome, streams.get(item)))
                _log_request(context, index, outcome["code"], job, batch=len(indices), checkpoint=checkpoint,
                             error=outcome)
        return responses

    def _run(self, jobs: list[StyleJob], callback, deadline: float, checkpoint: bool,
             should_stop=None) -> list[StyleResult | dict]:
        """The engine's results, or for every job an error object when the batch could not be run."""
        if self.device_failed:  # an earlier group of this call broke the device
            return [DEVICE_FAILED] * len(jobs)
        try:
            return stylize_batch(self.extractor, jobs, callback=callback, gram_cache=self.gram_cache,
                                 deadline=deadline, checkpoint=checkpoint, should_stop=should_stop)
        except Exception as error:
            if not _is_out_of_memory(error):  # not the client's fault
                logger.exception("style_transfer: optimisation failed")
                if self._device_works():
                    return [INTERNAL_ERROR] * len(jobs)  # a bug: answer 500, keep the worker
                logger.critical("style_transfer: %s no longer works; this worker ends once it has answered "
                                "and TorchServe starts a new one", self.device)
                self.device_failed = True
                return [DEVICE_FAILED] * len(jobs)
            logger.error("style_transfer: out of memory for %d request(s): %s", len(jobs), str(error))
        # Only here, after the except block, are the exception and the step's tensors its traceback held gone,
        # so that the allocator's cache can be handed back.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [OUT_OF_MEMORY] * len(jobs)

    def _device_works(self) -> bool:
        """Whether the device still runs work after a failure. Some CUDA errors (a device-side assert, an
        illegal memory access) leave the process's CUDA context unusable: every later call fails as well, and
        only a new process recovers. A tiny computation read back tells."""
        if self.device.type != "cuda":
            return True
        try:
            torch.ones(1, device=self.device).add_(1).cpu()
            torch.cuda.synchronize(self.device)
        except Exception:  # whatever the error, the device cannot be trusted with another request
            return False
        return True

    def _respond(self, context, index: int, result: StyleResult, output: OutputParams):
        image = encode_image(result.image, output.format, output.quality)
        headers = {"X-Style-Steps": str(result.steps), "X-Style-Seconds": f"{result.seconds:.3f}",
                   "X-Style-Loss": f"{result.final_loss['total']:.6g}", "X-Style-Stop-Reason": result.stop_reason,
                   "X-Style-Precision": result.precision}
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


def _asks_for_description(context, index: int) -> bool:
    """Whether request `index` is the management API's describe call with customized=true. TorchServe 0.12's
    frontend (ManagementRequestHandler.handleDescribeModel, and gRPC's DescribeModel) queues it as a job of
    the model, with no body and the header "describe" set to "True", and puts what the worker returns into
    the description's customizedMetadata. It is no control command, so it may share a batch with predictions:
    BaseHandler looks at the first request only and answers the batch with one description; we answer each."""
    return context.get_request_header(index, "describe") == "True"


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


def _time_share(deadline: float, costs: list[float]) -> float:
    """When the first of the call's remaining groups must end: its share of the time left by its cost. What a
    group leaves unused goes to the next; each group's own max_seconds applies within its share."""
    now = time.perf_counter()
    return now + (deadline - now) * costs[0] / sum(costs)


def _cost(prepared: dict, indices: list[int]) -> float:
    """What a group costs, roughly: output pixels times iterations, for each of its images."""
    job = prepared[indices[0]][0]
    height, width = output_size(job)
    return height * width * job.params.steps * len(indices)


def _batches(prepared: dict[int, tuple[StyleJob, OutputParams]], fit) -> list[list[int]]:
    """Request indices grouped so that each group can be optimised as one batch: same settings and output
    size, and together within the memory budget as they are (`fit(jobs)`); a request that needs
    checkpointing runs alone. Cheapest first."""
    groups: dict[tuple, list[int]] = {}
    for index, (job, _) in prepared.items():
        groups.setdefault((batch_key(job), output_size(job)), []).append(index)
    batches = []
    for indices in groups.values():
        batch = [indices[0]]
        for index in indices[1:]:
            if fit([prepared[i][0] for i in (*batch, index)]):
                batch.append(index)
            else:
                batches.append(batch)
                batch = [index]
        batches.append(batch)
    return sorted(batches, key=lambda batch: _cost(prepared, batch))  # the cheapest first: see _time_share


def _error(context, index: int, body: dict) -> str:
    """An error answer: its status, and CONTRACT.md's JSON error as the body."""
    context.set_response_status(body["code"], body["type"], index)
    context.set_response_content_type(index, "application/json")
    return json.dumps(body)


def _failure(context, index: int, error: dict, stream: ProgressStream | None) -> str:
    """The answer of a request whose optimisation failed. Once a stream has begun, its status (200) and
    content type have gone out with the first chunk: the error then ends the stream as its last line."""
    if stream is not None and stream.started:
        context.set_response_content_type(index, STREAM_CONTENT_TYPE)
        return json_line({"event": "error", **error})
    return _error(context, index, error)


def _log_request(context, index: int, status: int, job: StyleJob | None = None, result: StyleResult | None = None,
                 batch: int | None = None, checkpoint: bool = False, error: dict | None = None) -> None:
    """One line per request for operators, as JSON: what was asked, what ran, how it ended. No image data."""
    record: dict = {"request_id": context.request_ids[index], "status": status}
    if job is not None:
        height, width = output_size(job)
        record.update(size=f"{width}x{height}", styles=len(job.styles), batch=batch, checkpoint=checkpoint)
    if result is not None:
        record.update(steps=result.steps, precision=result.precision, seconds=round(result.seconds, 3),
                      stop_reason=result.stop_reason)
    if error is not None:
        record.update(error=error["type"], field=error["field"])
    logger.info("style_transfer request %s", json.dumps(record))


def _answer_then_exit(context, responses: list) -> None:
    """Send this call's answers to TorchServe's frontend as its worker loop would, then end the worker
    process: TorchServe starts a new one, with a new CUDA context, and until it is ready the model shows
    unhealthy on /ping and to readiness probes."""
    ids = context.request_ids
    try:
        _raise_for_a_lone_grpc_error(context, responses)
        message = create_predict_response(responses, ids, "Prediction success", 200, context=context)
    except PredictionException as error:
        message = create_predict_response(None, ids, error.message, error.error_code)
    context.cl_socket.sendall(message)
    logging.shutdown()
    os._exit(DEVICE_FAILED_EXIT_STATUS)


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
    for stage in ("admission", "run"):
        add("StyleOutOfMemory", 0, "count", None, _dimensions(context, Stage=stage), counter)


def _dimensions(context, **extra: str) -> list[Dimension]:
    """A new list each time (see _record_metrics), in metrics.yaml's order: ModelName, Level, then `extra`."""
    return [Dimension("ModelName", context.model_name), Dimension("Level", "Model"),
            *(Dimension(name, value) for name, value in extra.items())]
