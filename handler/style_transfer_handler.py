"""TorchServe handler: the glue between TorchServe and the rest. Each call prepares its requests
(preparation.py), hands them to the call's schedule (scheduler.py), runs the engine on each group it plans,
encodes the answers (answers.py) and reports (telemetry.py). The method lives in style_engine.

Its own `initialize` (not BaseHandler's): the archive holds a weights file rather than a serialized model,
and BaseHandler runs inference under torch.inference_mode(), where no gradient can flow to the image.
Every request in a batch gets its own answer: bad input is that request's 4xx JSON error (docs/api.md),
never an exception that would fail the others or the worker. The management API's describe call
(`GET /models/style_transfer?customized=true`) reaches `handle` too, as a request of its own (see
_asks_for_description), and is answered with the model's description.
TorchServe 0.12 takes this module's one class as the entry point: everything else lives in modules beside it.
"""

import json
import logging
import math
import os
import time

import torch
from ts.protocol.otf_message_handler import create_predict_response
from ts.utils.util import PredictionException

from answers import encode_answer
from cancellation import CancelSignals, job_key
from decoding import DecodingBudget, NoTimeLeft
from failures import DEVICE_FAILED, INTERNAL_ERROR, OUT_OF_MEMORY, device_works, guarded, unexpected_failure
from preparation import Preparation, Prepared, Segment
from scheduler import CallSchedule, ClientWait, expired_message
from server_config import ServerConfig
from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from streaming import ProgressStream, json_line
from style_engine import NotEnoughMemory, RequestError, VGGFeatures, load_features_state_dict
from style_engine.errors import NotEnoughTime
from style_engine.memory import Passes
from style_engine.optimize import StyleResult, stylize_batch
from style_engine.targets import GramCache
from telemetry import CallTelemetry, record_worker_start

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = "random: for tests only, the result shows no real style"
DEVICE_FAILED_EXIT_STATUS = 3  # a worker that ends on a failed device (TorchServe restarts it)
BUSY = {"code": 503, "type": "Busy", "field": None,
        "message": "this call of the worker had no time left for the request; send it again"}  # + a reason
EXPIRED = {"code": 503, "type": "Expired", "field": None}  # + expired_message


class StyleTransferHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context) -> None:
        record_worker_start(context)
        model_dir, gpu_id = context.system_properties["model_dir"], context.system_properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu")
        self.config = config = ServerConfig.from_model_yaml(context.model_yaml_config, self.device.type)
        state_dict = load_features_state_dict(os.path.join(model_dir, config.weights_file), config.deepest_layer)
        self.extractor = VGGFeatures(state_dict, config.deepest_layer).to(self.device)
        self.gram_cache = GramCache(config.gram_cache_entries, config.preset_gram_cache_entries)
        self.preparation = preparation = Preparation.on_worker(config, model_dir, self.extractor, self.device)
        self.description = json.dumps({**preparation.describe(), "weights": config.weights, "device": str(self.device)})
        self.device_failed = False  # set when the device can no longer run work: the worker then ends
        self.cancel_signals = CancelSignals.from_environment()  # jobs canceled through the jobs service
        if config.random_weights:
            logger.warning("style_transfer: this archive has RANDOM VGG19 weights (%s)", RANDOM_WEIGHTS_NOTE)
        logger.info("style_transfer: VGG19 up to %s on %s (TorchServe's gpu_id: %s), %.2f GiB for requests, "
                    "speed %s", config.deepest_layer, self.device, gpu_id, preparation.memory_budget / 2**30,
                    json.dumps(preparation.speed.describe()))
        self.initialized = True

    def handle(self, data: list[dict], context) -> list:
        # One deadline for the whole call: TorchServe waits responseTimeout for all of its answers together.
        call = CallTelemetry(context, time.perf_counter())
        schedule = CallSchedule(call.started, self.config.seconds_per_call, self.preparation.time_cap,
                                self.config.reply_margin_seconds)
        responses, prepared = self._prepare(call, schedule, data)
        schedule.plan(self.preparation.groups(prepared))
        while (turn := schedule.next_turn(time.perf_counter())) is not None:
            for index, reason in turn.refused:
                responses[index] = self._busy(call, index, schedule.deadline, reason)
            if turn.requests:
                for index, answer in zip(turn.requests, self._serve(call, prepared, turn.requests, turn.deadline)):
                    responses[index] = answer
        call.schedule(schedule.record(context.request_ids))
        return _send(context, responses, self.device_failed)

    def _prepare(self, call: CallTelemetry, schedule: CallSchedule, data: list[dict]) -> tuple[list, dict]:
        """Every request of the call prepared (by index), or else answered: the describe call, or refused."""
        context, now = call.context, time.time()
        decoding = DecodingBudget(self.config.max_decoded_pixels_per_call)
        responses, prepared = [None] * len(data), {}
        for index, row in enumerate(data):
            headers = context.get_all_request_header(index)
            wait = ClientWait.from_headers(headers)
            if _asks_for_description(context, index):
                context.set_response_content_type(index, "application/json")
                responses[index] = self.description
            elif not schedule.expect_client(index, wait, now):  # its client has gone: no decoding, no work
                responses[index] = self._expired(call, index, wait, now)
            else:
                try:
                    prepared[index] = self.preparation.prepare(row, _is_grpc(context, index), decoding, headers)
                except NoTimeLeft as busy:
                    responses[index] = self._busy(call, index, schedule.deadline, busy.reason)
                except Exception as error:  # noqa: BLE001 - whatever it is, it is this request's alone
                    responses[index] = self._refuse(call, index, error)
        return responses, prepared

    def _refuse(self, call: CallTelemetry, index: int, error: Exception) -> str:
        """The answer of a request that its preparation refused (a RequestError) or failed on."""
        if not isinstance(error, RequestError):
            failure = unexpected_failure(call, index, error, stage="prepare")
            call.request(index, failure["code"], error=failure)
            return _error(call.context, index, failure)
        if isinstance(error, (NotEnoughMemory, NotEnoughTime)):
            call.refused(index, reason="memory" if isinstance(error, NotEnoughMemory) else "time")
        call.request(index, error.status, error=error.to_json())
        return _error(call.context, index, error.to_json())

    def _busy(self, call: CallTelemetry, index: int, deadline: float, reason: str) -> str:
        """503 with Retry-After: the request is fine, this call had no time left for it."""
        retry = max(1, math.ceil(deadline - time.perf_counter()))
        body = {**BUSY, "message": f"{reason}; send it again in {retry} s (Retry-After)"}
        return self._unavailable(call, index, body, retry, reason="busy")

    def _expired(self, call: CallTelemetry, index: int, wait: ClientWait, now: float) -> str:
        """503 Expired, before any decoding: the request waited longer than its client waits, which has had its
        answer from the proxy (504) already. Retry-After: how much longer than that it waited (the queue's excess),
        at least 1 s and at most a request's time here (a client's own headers could claim any wait)."""
        retry = max(1, min(math.ceil(-wait.left(now)), math.ceil(self.preparation.time_cap)))
        return self._unavailable(call, index, {**EXPIRED, "message": expired_message(wait, now)}, retry,
                                 reason="expired")

    def _unavailable(self, call: CallTelemetry, index: int, body: dict, retry: int, reason: str) -> str:
        call.context.set_response_header(index, "Retry-After", str(retry))
        call.refused(index, reason=reason)
        call.request(index, 503, error=body)
        return _error(call.context, index, body)

    def _serve(self, call: CallTelemetry, prepared: dict, indices: tuple[int, ...], deadline: float) -> list:
        """Optimise one group of requests together; one response (or error) per request, in order. `deadline`
        ends its iterations."""
        context, queued = call.context, time.perf_counter() - call.started
        streams = {item: ProgressStream(context, index, prepared[index].output.preview)
                   for item, index in enumerate(indices) if prepared[index].output.stream}
        jobs = [prepared[i].job for i in indices]
        passes = self.preparation.passes(jobs)
        should_stop = self.cancel_signals.watch([job_key(context.get_all_request_header(i)) for i in indices])
        outcomes = self._run(jobs, _dispatch(streams) if streams else None, passes, should_stop=should_stop,
                             **_segment_run(prepared[indices[0]].segment, deadline))
        logged = {"batch": len(indices), "passes": passes, "queued": queued}
        return [self._answer(call, index, prepared[index], outcome, streams.get(item), logged)
                for item, (index, outcome) in enumerate(zip(indices, outcomes))]

    def _answer(self, call: CallTelemetry, index: int, request: Prepared, outcome, stream, logged: dict):
        """The answer of one request of a group: its image, or the error its optimisation or encoding met."""
        logged = {"job": request.job, **logged}
        if isinstance(outcome, StyleResult):
            try:
                answer = encode_answer(outcome, request.output, self.config.random_weights and RANDOM_WEIGHTS_NOTE,
                                       self.config.max_response_size)
                for chunk in answer.leading:  # a segment's checkpoint, in pieces within max_response_size
                    stream.send(chunk)
                for name, value in answer.headers.items():
                    call.context.set_response_header(index, name, value)
                call.succeeded(index, outcome)
                call.context.set_response_content_type(index, answer.content_type)
                call.request(index, 200, result=outcome, **logged)
                return answer.body
            except Exception as error:  # noqa: BLE001 - encoding one answer fails that answer only
                outcome = unexpected_failure(call, index, error, stage="encode")
        elif outcome["type"] == OUT_OF_MEMORY["type"]:
            call.out_of_memory(index, stage="run")
        elif outcome["type"] == INTERNAL_ERROR["type"]:
            call.internal_error(index, stage="run")
        call.request(index, outcome["code"], error=outcome, **logged)
        return _failure(call, index, outcome, stream)

    def _run(self, jobs, callback, passes: Passes, should_stop, **segment) -> list[StyleResult | dict]:
        """The engine's results, or for every job an error object when the batch could not be run; `segment`:
        the run's deadline, and a segment's resume and suspend (_segment_run)."""
        if self.device_failed:  # an earlier group of this call broke the device
            return [DEVICE_FAILED] * len(jobs)
        outcomes = guarded(lambda: stylize_batch(self.extractor, jobs, callback=callback, gram_cache=self.gram_cache,
                                                 checkpoint=passes.checkpoint, tile=passes.tile,
                                                 should_stop=should_stop, **segment),
                           len(jobs), self.device, self._device_works)
        self.device_failed = outcomes[0] is DEVICE_FAILED
        return outcomes

    def _device_works(self) -> bool:
        return device_works(self.device)


def _segment_run(segment: Segment | None, deadline: float) -> dict:
    """The engine's options for a group: its deadline, or for a segment the checkpoint it resumes from and when it
    suspends instead (at its time, or at the call's deadline, whichever comes first)."""
    if segment is None or segment.seconds is None:
        return {"deadline": deadline, "resume": segment and segment.resume}
    ends = min(deadline, time.perf_counter() + segment.seconds)
    return {"deadline": None, "resume": segment.resume, "suspend": lambda: time.perf_counter() >= ends}


def _send(context, responses: list, device_failed: bool) -> list:
    """The call's answers as TorchServe takes them."""
    for index in range(len(responses)):
        if _is_grpc(context, index):
            # TorchServe 0.12's gRPC StreamPredictions reads this header without a null check and restarts
            # the worker when a final response lacks it (GRPCJob.response). Not for REST, where "false"
            # on an unstreamed response leaves the client waiting for a chunked end that never comes.
            context.set_response_header(index, "ts_stream_next", "false")
    if device_failed:
        _answer_then_exit(context, responses)
    _raise_for_a_lone_grpc_error(context, responses)
    return responses


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


def _error(context, index: int, body: dict) -> str:
    """An error answer: its status, and the API's JSON error (docs/api.md) as the body."""
    context.set_response_status(body["code"], body["type"], index)
    context.set_response_content_type(index, "application/json")
    return json.dumps(body)


def _failure(call: CallTelemetry, index: int, error: dict, stream: ProgressStream | None) -> str:
    """The answer of a request whose optimisation failed. Once a stream has begun, its status (200) and
    content type have gone out with the first chunk: the error then ends the stream as its last line."""
    if stream is not None and stream.started:
        call.stream_failed(index)
        call.context.set_response_content_type(index, STREAM_CONTENT_TYPE)
        return json_line({"event": "error", **error})
    return _error(call.context, index, error)


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
