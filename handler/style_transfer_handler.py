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
import math
import os
import time
from dataclasses import replace

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import create_predict_response
from ts.utils.util import PredictionException

from call_limits import ClientWait, DecodingBudget, NoTimeLeft, answer_bytes_bound, bound_is_text, expired_message
from cancellation import CancelSignals, job_key
from request_parsing import declared_pixels, decode_job, parse_request
from server_config import ServerConfig
from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from streaming import ProgressStream, json_line
from style_engine import (NotEnoughMemory, ParamError, RequestError, StyleJob, TooLargeError, VGGFeatures,
                          batch_key, load_features_state_dict, parse_params)
from style_engine.api import result_fields
from style_engine.codec import encode_image
from style_engine.cost import group_cost, largest_size_within, measure_speed
from style_engine.errors import NotEnoughTime
from style_engine.memory import Passes, admit, fitting_mode, free_bytes
from style_engine.optimize import StyleResult, stylize_batch
from style_engine.params import PARAM_FIELDS, OutputParams, describe_params
from style_engine.presets import ARCHIVE_DIR, PresetLibrary
from style_engine.resize import fit_longer_side
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
BUSY = {"code": 503, "type": "Busy", "field": None,
        "message": "this call of the worker had no time left for the request; send it again"}  # + a reason
EXPIRED = {"code": 503, "type": "Expired", "field": None}  # + expired_message
INTERNAL_ERROR = {"code": 500, "type": "InternalError", "field": None,
                  "message": "the optimisation failed unexpectedly; the server log has the details"}
OUTCOME_STAGES = ("prepare", "run", "encode")  # where a request's unexpected failure can happen
REFUSAL_REASONS = ("memory", "time", "busy", "expired")  # why a request is refused before any work (StyleRefusals)
STAGE_WORDS = {"prepare": "reading this request", "encode": "encoding this request's answer"}
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
        # the device's speed, timed here on the worker's own device: the time model's unit (style_engine/cost.py)
        self.speed = measure_speed(self.extractor, self.device)
        # the longest a request may take, all its work included: the server's max_seconds maximum
        self.time_cap = min(self.config.seconds_per_call, self.config.maxima.get("max_seconds", math.inf))
        self.description = json.dumps({
            "presets": self.presets.describe(), "parameters": describe_params(self.config.defaults, self.config.maxima),
            "limits": {**self.config.limits(), "memory_budget_bytes": self.memory_budget,
                       "device_speed": self.speed.describe()},
            "weights": self.config.weights, "device": str(self.device)})
        self.device_failed = False  # set when the device can no longer run work: the worker then ends
        self.cancel_signals = CancelSignals.from_environment()  # jobs canceled through the jobs service
        if self.config.random_weights:
            logger.warning("style_transfer: this archive has RANDOM VGG19 weights (%s)", RANDOM_WEIGHTS_NOTE)
        logger.info("style_transfer: VGG19 up to %s on %s (TorchServe's gpu_id: %s), %.2f GiB for requests, "
                    "speed %s", self.config.deepest_layer, self.device, gpu_id, self.memory_budget / 2**30,
                    json.dumps(self.speed.describe()))
        self.initialized = True

    def handle(self, data: list[dict], context) -> list:
        # One deadline for the whole call: TorchServe waits responseTimeout for all of its answers together.
        started, now = time.perf_counter(), time.time()
        deadline = started + self.config.seconds_per_call
        responses: list = [None] * len(data)
        prepared: dict[int, tuple[StyleJob, OutputParams]] = {}
        client_ends: dict[int, float] = {}  # by request: when its answer must be ready for its client to read it
        decoding = DecodingBudget(self.config.max_decoded_pixels_per_call)
        for index, row in enumerate(data):
            if _asks_for_description(context, index):
                context.set_response_content_type(index, "application/json")
                responses[index] = self.description
                continue
            wait = ClientWait.from_headers(context.get_all_request_header(index))
            if wait is not None and wait.left(now) <= 0:  # its client has gone: no decoding, no work
                responses[index] = self._expired(context, index, started, wait, now)
                continue
            if wait is not None:  # it keeps back what the call keeps back of responseTimeout
                client_ends[index] = started + wait.left(now) - self.config.reply_margin_seconds
            try:
                prepared[index] = self._prepare(row, _is_grpc(context, index), decoding)
            except RequestError as error:
                if isinstance(error, (NotEnoughMemory, NotEnoughTime)):
                    _record_refusal(context, index, reason="memory" if isinstance(error, NotEnoughMemory) else "time")
                responses[index] = _error(context, index, error.to_json())
                _log_request(context, index, error.status, started, error=error.to_json())
            except NoTimeLeft as busy:
                responses[index] = self._busy(context, index, started, deadline, busy.reason)
            except Exception as error:  # noqa: BLE001 - whatever it is, it is this request's alone
                failure = _unexpected_failure(context, index, error, stage="prepare")
                responses[index] = _error(context, index, failure)
                _log_request(context, index, failure["code"], started, error=failure)
        self._serve_groups(context, prepared, started, deadline, responses, client_ends)
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

    def _prepare(self, row: dict, grpc: bool,
                 decoding: DecodingBudget | None = None) -> tuple[StyleJob, OutputParams]:
        """Parse and check one request up to the point where only the optimisation is left. Its uploads'
        declared pixels are taken from `decoding`, this call's budget, before any is decoded."""
        request = parse_request(row, self.config.max_styles)
        style_params, output_params = parse_params(request.params, defaults=self.config.defaults,
                                                   maxima=self.config.maxima)
        if grpc and output_params.stream:
            raise ParamError("stream", GRPC_STREAM_REFUSED)
        (decoding or DecodingBudget(self.config.max_decoded_pixels_per_call)).take(
            declared_pixels(request, self.config.max_image_pixels))
        job = decode_job(request, style_params, self.presets, self.config.max_image_pixels)
        check_job(job, self.extractor, self.config.max_style_pixels, self.config.max_styles)
        self._check_answer_size(job, output_params)
        job = shrink_to_need(job)  # what waits for its batch holds megabytes, not gigabytes
        passes = admit(job, self.device, self.memory_budget, self.config.save_memory)
        self._admit_time(job, passes)
        return job, output_params

    def _check_answer_size(self, job: StyleJob, output: OutputParams) -> None:
        """Refuse (413) a request whose answer could be larger than TorchServe's max_response_size: the frontend
        would drop the worker's connection and restart it. Names `format` where another format fits at this
        size, else `size` and the largest that fits."""
        limit = self.config.max_response_size
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

    def _admit_time(self, job: StyleJob, passes: Passes) -> None:
        """Refuse (413, naming `size` and the largest size that fits) a request whose work that no time budget
        interrupts, and one iteration past its deadline, could not end within the server's maximum even alone
        (style_engine/cost.py)."""
        cost = group_cost([job], self.device, self.speed, passes)
        if cost.reserved <= self.time_cap:
            return
        smallest = PARAM_FIELDS["size"].metadata["check"].lo
        largest = largest_size_within(job, self.device, self.speed, self.time_cap, smallest)
        fits = (f"size at most {largest} fits" if largest is not None else
                "no size fits: send fewer or smaller style images or a smaller style_scale")
        raise NotEnoughTime("size", f"size {job.params.size} with these images and settings needs about "
                                    f"{cost.reserved:.1f} s that no time budget interrupts, at this worker's "
                                    f"measured speed: {cost.fixed:.1f} s of work (the style targets at every scale, "
                                    f"the reported losses, encoding) and an iteration at the output size "
                                    f"({cost.iteration:.1f} s) that may start just before the end, with a margin; "
                                    f"a request may take at most {self.time_cap:g} s here: {fits}")

    def _serve_groups(self, context, prepared: dict, started: float, deadline: float, responses: list,
                      client_ends: dict[int, float]) -> None:
        """Optimise the prepared requests group by group, the cheapest first, so that the whole call ends by
        `deadline`: before each group, the groups whose reserved time (cost.py: fixed work and an iteration past
        the deadline) no longer fits the time left are answered 503 (the most expensive first), and the group
        gets its reserved time plus its share of the time the others' leave, by its iterations' cost; its
        iterations end early enough for what may run past their deadline. What a group leaves unused goes to the
        next.
        A group also ends by the earliest of its requests' `client_ends`, and a request whose client's end
        leaves less than the group's fixed work is answered 503 instead of being computed for nobody."""
        costs = {tuple(group): group_cost([prepared[i][0] for i in group], self.device, self.speed,
                                          self._passes([prepared[i][0] for i in group]))
                 for group in _batches(prepared, self._fit_as_they_are)}
        waiting = sorted(costs, key=lambda group: costs[group].fixed + costs[group].iterations)
        while waiting:
            now = time.perf_counter()
            while waiting and sum(costs[group].reserved for group in waiting) > deadline - now:
                for index in waiting.pop():
                    responses[index] = self._busy(context, index, started, deadline,
                                                  "the requests of this call before it leave too little time")
            if not waiting:
                return
            total = sum((costs[group] for group in waiting[1:]), costs[waiting[0]])
            group = waiting.pop(0)
            cost = costs[group]
            spare = deadline - now - total.reserved
            end = min(now + cost.reserved + spare * cost.iterations / max(total.iterations, 1e-9), now + self.time_cap)
            group = self._within_client_ends(context, group, client_ends, now + cost.fixed, started, deadline,
                                             responses)
            if not group:
                continue
            end = min([end, *(client_ends[i] for i in group if i in client_ends)])
            iterations_end = end - cost.past_deadline
            for index, response in zip(group, self._serve(context, prepared, group, iterations_end, started)):
                responses[index] = response

    def _within_client_ends(self, context, group: tuple, client_ends: dict[int, float], earliest_end: float,
                            started: float, deadline: float, responses: list) -> list[int]:
        """The requests of `group` whose clients still wait at `earliest_end`; the others are answered 503."""
        kept = []
        for index in group:
            if client_ends.get(index, math.inf) < earliest_end:
                responses[index] = self._busy(context, index, started, deadline, "its client's timeout (the proxy's "
                                              "X-Request-Timeout-Ms) leaves too little time for its work")
            else:
                kept.append(index)
        return kept

    def _busy(self, context, index: int, started: float, deadline: float, reason: str) -> str:
        """503 with Retry-After: the request is fine, this call had no time left for it."""
        retry = max(1, math.ceil(deadline - time.perf_counter()))
        body = {**BUSY, "message": f"{reason}; send it again in {retry} s (Retry-After)"}
        context.set_response_header(index, "Retry-After", str(retry))
        _record_refusal(context, index, reason="busy")
        _log_request(context, index, 503, started, error=body)
        return _error(context, index, body)

    def _expired(self, context, index: int, started: float, wait: ClientWait, now: float) -> str:
        """503 Expired, before any decoding: the request waited longer than its client waits, which has had its
        answer from the proxy (504) already. Retry-After: how much longer than that it waited (the queue's excess),
        at least 1 s and at most a request's time here (a client's own headers could claim any wait)."""
        retry = max(1, min(math.ceil(-wait.left(now)), math.ceil(self.time_cap)))
        body = {**EXPIRED, "message": expired_message(wait, now)}
        context.set_response_header(index, "Retry-After", str(retry))
        _record_refusal(context, index, reason="expired")
        _log_request(context, index, 503, started, error=body)
        return _error(context, index, body)

    def _fit_as_they_are(self, jobs: list[StyleJob]) -> bool:
        """Whether these jobs fit the memory budget optimised together with full passes, not checkpointed (or
        with the localized passes they ask for)."""
        return fitting_mode(jobs, self.device, self.memory_budget, save_memory=False) is not None

    def _passes(self, jobs: list[StyleJob]) -> Passes:
        """How a group runs: a batch only where its jobs fit as they are (_batches), a job alone as admit chose."""
        return fitting_mode(jobs, self.device, self.memory_budget, self.config.save_memory)

    def _serve(self, context, prepared: dict, indices: list[int], deadline: float, started: float) -> list:
        """Optimise one group of requests together; one response (or error) per request, in order. `deadline`
        ends its iterations; `started` is when the call began (the log's queue and total times)."""
        queued = time.perf_counter() - started
        streams = {item: ProgressStream(context, index, prepared[index][1].preview)
                   for item, index in enumerate(indices) if prepared[index][1].stream}
        jobs = [prepared[i][0] for i in indices]
        passes = self._passes(jobs)
        should_stop = self.cancel_signals.watch([job_key(context.get_all_request_header(i)) for i in indices])
        outcomes = self._run(jobs, _dispatch(streams) if streams else None, deadline, passes,
                             should_stop=should_stop)
        responses = []
        for item, (index, outcome) in enumerate(zip(indices, outcomes)):
            job, output = prepared[index]
            logged = {"job": job, "batch": len(indices), "passes": passes, "queued": queued}
            if isinstance(outcome, StyleResult):
                try:
                    responses.append(self._respond(context, index, outcome, output))
                    _log_request(context, index, 200, started, result=outcome, **logged)
                    continue
                except Exception as error:  # noqa: BLE001 - encoding one answer fails that answer only
                    outcome = _unexpected_failure(context, index, error, stage="encode")
            elif outcome["type"] == OUT_OF_MEMORY["type"]:
                _record_out_of_memory(context, index, stage="run")
            elif outcome["type"] == INTERNAL_ERROR["type"]:
                _record_internal_error(context, index, stage="run")
            responses.append(_failure(context, index, outcome, streams.get(item)))
            _log_request(context, index, outcome["code"], started, error=outcome, **logged)
        return responses

    def _run(self, jobs: list[StyleJob], callback, deadline: float, passes: Passes,
             should_stop=None) -> list[StyleResult | dict]:
        """The engine's results, or for every job an error object when the batch could not be run."""
        if self.device_failed:  # an earlier group of this call broke the device
            return [DEVICE_FAILED] * len(jobs)
        try:
            return stylize_batch(self.extractor, jobs, callback=callback, gram_cache=self.gram_cache,
                                 deadline=deadline, checkpoint=passes.checkpoint, tile=passes.tile,
                                 should_stop=should_stop)
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
        fields = {"image": base64.b64encode(image).decode("ascii"), **result_fields(result, output.format)}
        if output.stream:
            content_type, body = STREAM_CONTENT_TYPE, json_line({"event": "done", **fields})
        elif output.response == "json":
            content_type, body = "application/json", json.dumps(fields)
        else:
            content_type, body = CONTENT_TYPES[output.format], image
        if len(body) > self.config.max_response_size:  # answer_bytes_bound was wrong: never let the worker go
            raise RuntimeError(f"the answer has {len(body)} bytes, over max_response_size "
                               f"({self.config.max_response_size}); answer_bytes_bound said at most "
                               f"{answer_bytes_bound(*result.image.shape[-2:], output)}")
        _record_metrics(context, index, result)
        context.set_response_content_type(index, content_type)
        return body


def _resized_output(job: StyleJob, size: int) -> tuple[int, int]:
    return fit_longer_side(*job.content.shape[-2:], size)


def _unexpected_failure(context, index: int, error: Exception, stage: str) -> dict:
    """The error object for an exception no check foresaw while preparing or encoding request `index`
    (`stage`): out of memory is 507 and counted as such, anything else a 500. Logged with its traceback."""
    if _is_out_of_memory(error):
        logger.error("style_transfer: out of memory at stage %s for request %s: %r", stage,
                     context.request_ids[index], error)
        _record_out_of_memory(context, index, stage=stage)
        return {**OUT_OF_MEMORY, "field": "size" if stage == "encode" else None,
                "message": f"the worker ran out of memory while {STAGE_WORDS[stage]}; try smaller images, a "
                           f"smaller size or fewer styles"}
    logger.exception("style_transfer: request %s failed at stage %s", context.request_ids[index], stage)
    _record_internal_error(context, index, stage=stage)
    return {**INTERNAL_ERROR, "message": f"the request failed unexpectedly while {STAGE_WORDS[stage]}; the "
                                         f"server log has the details"}


def _is_out_of_memory(error: Exception) -> bool:
    """CUDA raises torch.OutOfMemoryError; torch's CPU allocator a RuntimeError that only its message tells."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in CPU_ALLOCATION_FAILED))


def _asks_for_description(context, index: int) -> bool:
    """Whether request `index` is the management API's describe call with customized=true. TorchServe 0.12's
    frontend (ManagementRequestHandler.handleDescribeModel, and gRPC's DescribeModel) queues it as a job of
    the model, with no body and the header "describe" set to "True", and puts what the worker returns into
    the description's customizedMetadata. It is no control command, so it may share a batch with predictions:
    BaseHandler looks at the first request only and answers the batch with one description; we answer each.
    A request of the inference API may carry any header, "describe" too; its frontend adds "url_path" to each
    (InferenceRequestHandler), which the management API's call lacks: such a request is a prediction."""
    return (context.get_request_header(index, "describe") == "True"
            and context.get_request_header(index, "url_path") is None)


def _is_grpc(context, index: int) -> bool:
    """gRPC requests reach the handler with no HTTP header, only the per-parameter content types (dicts)."""
    return not any(isinstance(value, str) for value in context.get_all_request_header(index).values())


def _raise_for_a_lone_grpc_error(context, responses: list) -> None:
    """Give a refused gRPC request a gRPC error status carrying our JSON error as its message.

    TorchServe 0.12 ignores per-request statuses on gRPC (a refused request would come back as OK with the
    error as its prediction); only an exception sets the status, and it sets it for the whole batch. So this
    applies to a batch of one; a gRPC request refused within a larger batch gets the JSON error as its
    prediction (docs/api.md, "gRPC").
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


def _batches(prepared: dict[int, tuple[StyleJob, OutputParams]], fit) -> list[list[int]]:
    """Request indices grouped so that each group can be optimised as one batch: same settings and output
    size, and together within the memory budget as they are (`fit(jobs)`); a request that needs
    checkpointing or localized passes to fit runs alone."""
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
    return batches


def _error(context, index: int, body: dict) -> str:
    """An error answer: its status, and CONTRACT.md's JSON error as the body."""
    context.set_response_status(body["code"], body["type"], index)
    context.set_response_content_type(index, "application/json")
    return json.dumps(body)


def _failure(context, index: int, error: dict, stream: ProgressStream | None) -> str:
    """The answer of a request whose optimisation failed. Once a stream has begun, its status (200) and
    content type have gone out with the first chunk: the error then ends the stream as its last line."""
    if stream is not None and stream.started:
        context.metrics.add_metric("StyleStreamErrors", 1, "count", index, _dimensions(context), MetricTypes.COUNTER)
        context.set_response_content_type(index, STREAM_CONTENT_TYPE)
        return json_line({"event": "error", **error})
    return _error(context, index, error)


def _log_request(context, index: int, status: int, started: float, job: StyleJob | None = None,
                 result: StyleResult | None = None, batch: int | None = None, passes: Passes = Passes(),
                 queued: float | None = None, error: dict | None = None) -> None:
    """One line per request for operators, as JSON: what was asked, what ran, how it ended, how long it waited
    in this call for the groups before its own (`queued`) and how long the call had run when it was answered
    (`total_seconds`). No image data. TorchServe's own queue time is its ts_queue_latency_microseconds. A run
    of the jobs service names itself (`job`: its X-Style-Job-Id, the job and the run)."""
    record: dict = {"request_id": context.request_ids[index], "status": status}
    if job_run := job_key(context.get_all_request_header(index)):
        record.update(job=job_run)
    if job is not None:
        height, width = output_size(job)
        record.update(size=f"{width}x{height}", styles=len(job.styles), masks=len(job.masks),
                      presets=list(job.params.presets), batch=batch, checkpoint=passes.checkpoint, tile=passes.tile)
    if result is not None:
        record.update(steps=result.steps, precision=result.precision, seconds=round(result.seconds, 3),
                      stop_reason=result.stop_reason)
    if error is not None:
        record.update(error=error["type"], field=error["field"])
    if queued is not None:
        record.update(queue_seconds=round(queued, 3))
    record.update(total_seconds=round(time.perf_counter() - started, 3))
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


def _record_refusal(context, index: int, reason: str) -> None:
    """One StyleRefusals count for a request refused before any work for what this worker can do, by reason
    (REFUSAL_REASONS): memory or time (413: it could never fit here), busy (503: this call had no time left for
    it), expired (503: it waited longer than its client waits)."""
    context.metrics.add_metric("StyleRefusals", 1, "count", index, _dimensions(context, Reason=reason),
                               MetricTypes.COUNTER)


def _record_internal_error(context, index: int, stage: str) -> None:
    """One StyleInternalErrors count for a request answered 500 InternalError: a bug, at `stage`."""
    context.metrics.add_metric("StyleInternalErrors", 1, "count", index, _dimensions(context, Stage=stage),
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
    # Counters whose increase the alerts or the dashboard watch start at 0: the first sample of a new series is
    # no increase to rate() or increase(), so the first success or out-of-memory answer of a server would go unseen.
    add("StyleOptimizationSeconds", 0, "s", None, _dimensions(context), counter)
    for stage in OUTCOME_STAGES:
        add("StyleOutOfMemory", 0, "count", None, _dimensions(context, Stage=stage), counter)
        add("StyleInternalErrors", 0, "count", None, _dimensions(context, Stage=stage), counter)
    add("StyleStreamErrors", 0, "count", None, _dimensions(context), counter)
    for reason in REFUSAL_REASONS:
        add("StyleRefusals", 0, "count", None, _dimensions(context, Reason=reason), counter)


def _dimensions(context, **extra: str) -> list[Dimension]:
    """A new list each time (see _record_metrics), in metrics.yaml's order: ModelName, Level, then `extra`."""
    return [Dimension("ModelName", context.model_name), Dimension("Level", "Model"),
            *(Dimension(name, value) for name, value in extra.items())]
