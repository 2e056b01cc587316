"""What the worker reports: custom metrics (declared in metrics.yaml, served with TorchServe's own on the
metrics port) and its log: one JSON line per request and one per call (the call's schedule, scheduler.py).

Each metric call passes a new `dimensions` list: TorchServe 0.12's add_metric defaults it to one shared list and
appends its default dimensions to it.
"""

import json
import logging
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from cancellation import job_key
from style_engine.memory import Passes
from style_engine.optimize import StyleResult
from style_engine.targets import StyleJob, output_size

logger = logging.getLogger(__name__)

OUTCOME_STAGES = ("prepare", "run", "encode")  # where a request's unexpected failure can happen
REFUSAL_REASONS = ("memory", "time", "busy", "expired")  # why a request is refused before any work (StyleRefusals)
COUNTER, GAUGE = MetricTypes.COUNTER, MetricTypes.GAUGE


class CallTelemetry:
    """The metrics and log lines of one call of the handler, which began at `started` (time.perf_counter())."""

    def __init__(self, context, started: float):
        self.context, self.started = context, started

    def succeeded(self, index: int, result: StyleResult) -> None:
        add = self.context.metrics.add_metric
        add("StyleOptimizationSeconds", result.seconds, "s", index, [], COUNTER)
        add("StyleSteps", result.steps, "count", index, [], COUNTER)
        add("StyleStepsPerSecond", result.steps / max(result.seconds, 1e-9), "per_second", index, [], GAUGE)
        add("StyleFinalLoss", result.final_loss["total"], "loss", index, [], GAUGE)
        if result.stop_reason != "steps":
            add("StyleEarlyStops", 1, "count", index, _dimensions(self.context, StopReason=result.stop_reason), COUNTER)

    def refused(self, index: int, reason: str) -> None:
        """One StyleRefusals count for a request refused before any work for what this worker can do, by reason
        (REFUSAL_REASONS): memory or time (413: it could never fit here), busy (503: this call had no time left
        for it), expired (503: it waited longer than its client waits)."""
        self._count(index, "StyleRefusals", Reason=reason)

    def out_of_memory(self, index: int, stage: str) -> None:
        """One StyleOutOfMemory count for a request answered 507 OutOfMemory; `stage` says when memory ran out."""
        self._count(index, "StyleOutOfMemory", Stage=stage)

    def internal_error(self, index: int, stage: str) -> None:
        """One StyleInternalErrors count for a request answered 500 InternalError: a bug, at `stage`."""
        self._count(index, "StyleInternalErrors", Stage=stage)

    def stream_failed(self, index: int) -> None:
        """One StyleStreamErrors count for a stream that ended with an error line."""
        self._count(index, "StyleStreamErrors")

    def _count(self, index: int, name: str, **dimensions: str) -> None:
        self.context.metrics.add_metric(name, 1, "count", index, _dimensions(self.context, **dimensions), COUNTER)

    def request(self, index: int, status: int, job: StyleJob | None = None, result: StyleResult | None = None,
                batch: int | None = None, passes: Passes = Passes(), queued: float | None = None,
                error: dict | None = None) -> None:
        """One line per request for operators, as JSON: what was asked, what ran, how it ended, how long it waited
        in this call for the groups before its own (`queued`) and how long the call had run when it was answered
        (`total_seconds`). No image data. TorchServe's own queue time is its ts_queue_latency_microseconds. A run
        of the jobs service names itself (`job`: its X-Style-Job-Id, the job and the run)."""
        record: dict = {"request_id": self.context.request_ids[index], "status": status}
        if job_run := job_key(self.context.get_all_request_header(index)):
            record.update(job=job_run)
        if job is not None:
            height, width = output_size(job)
            record.update(size=f"{width}x{height}", styles=len(job.styles), masks=len(job.masks),
                          presets=list(job.params.presets), batch=batch, checkpoint=passes.checkpoint,
                          tile=passes.tile)
        if result is not None:
            record.update(steps=result.steps, precision=result.precision, seconds=round(result.seconds, 3),
                          stop_reason=result.stop_reason)
        if error is not None:
            record.update(error=error["type"], field=error["field"])
        if queued is not None:
            record.update(queue_seconds=round(queued, 3))
        record.update(total_seconds=round(time.perf_counter() - self.started, 3))
        logger.info("style_transfer request %s", json.dumps(record))

    def schedule(self, record: dict) -> None:
        """One line per call: its schedule (CallSchedule.record), and how long the call took."""
        record = {**record, "total_seconds": round(time.perf_counter() - self.started, 3)}
        logger.info("style_transfer call %s", json.dumps(record))


def record_worker_start(context) -> None:
    """At each worker start, before anything that could fail: count the start, set alerted counters to 0.

    TorchServe 0.12 counts no worker restarts. Its WorkerLoadTime is a gauge set after a successful load, so
    Prometheus would see a restart only as a changed value between two scrapes, missing a failed load, a second
    restart within one scrape interval and a load that took the same milliseconds. The frontend sums
    StyleWorkerStarts over the worker processes it starts, so its increase is the restarts.
    """
    add = context.metrics.add_metric
    add("StyleWorkerStarts", 1, "count", None, _dimensions(context), COUNTER)
    # Counters whose increase the alerts or the dashboard watch start at 0: the first sample of a new series is
    # no increase to rate() or increase(), so the first success or out-of-memory answer of a server would go unseen.
    add("StyleOptimizationSeconds", 0, "s", None, _dimensions(context), COUNTER)
    for stage in OUTCOME_STAGES:
        add("StyleOutOfMemory", 0, "count", None, _dimensions(context, Stage=stage), COUNTER)
        add("StyleInternalErrors", 0, "count", None, _dimensions(context, Stage=stage), COUNTER)
    add("StyleStreamErrors", 0, "count", None, _dimensions(context), COUNTER)
    for reason in REFUSAL_REASONS:
        add("StyleRefusals", 0, "count", None, _dimensions(context, Reason=reason), COUNTER)


def _dimensions(context, **extra: str) -> list[Dimension]:
    """A new list each time (see the module's doc), in metrics.yaml's order: ModelName, Level, then `extra`."""
    return [Dimension("ModelName", context.model_name), Dimension("Level", "Model"),
            *(Dimension(name, value) for name, value in extra.items())]
