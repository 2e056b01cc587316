"""One request made ready for the optimisation, top to bottom: parse → check → decode → size → admit.

Each step is one file, and no step goes back to an earlier one's:
- parse: request_parsing.py, the TorchServe request's image parts and raw parameters;
- check: style_engine/params.py, the parameters against the server's defaults and maxima;
- decode: decoding.py, the images, within the pixels this call of the handler may decode;
- size: style_engine/targets.py, the request against the extractor and the server's limits, then its images
  reduced to the sizes the optimisation uses;
- admit: answers.py (the answer within TorchServe's max_response_size), style_engine/memory.py (the memory
  budget), style_engine/cost.py (the time a request may take here).
A step that refuses the request raises a RequestError naming the field at fault (4xx), or NoTimeLeft (503).
The worker's capacity (device, memory budget, measured speed) also groups prepared requests for the
scheduler (scheduler.py): `groups`.
"""

import math
import os
from typing import NamedTuple

import torch

from answers import check_answer_size
from cancellation import job_key
from decoding import DecodingBudget, decode_request
from request_parsing import parse_request
from scheduler import Group, batches
from server_config import ServerConfig
from style_engine import ParamError, StyleJob, VGGFeatures, batch_key, parse_params
from style_engine.cost import DeviceSpeed, group_cost, largest_size_within, measure_speed
from style_engine.errors import NotEnoughTime, TooLargeError
from style_engine.memory import Passes, admit, fitting_mode, free_bytes
from style_engine.params import PARAM_FIELDS, OutputParams, describe_params
from style_engine.optimize import scale_sizes
from style_engine.presets import ARCHIVE_DIR, PresetLibrary
from style_engine.segments import Checkpoint, check_resume, decode_checkpoint
from style_engine.targets import check_job, output_size, shrink_to_need

# TorchServe 0.12 gives the handler no way to tell a unary Predictions call from StreamPredictions, and a
# progress chunk sent to a unary call makes it close the call and restart the worker.
GRPC_STREAM_REFUSED = ("stream=true is not available over gRPC: TorchServe 0.12 cannot tell Predictions from "
                       "StreamPredictions and a progress message would end a Predictions call; call without "
                       "stream (both RPCs return the result), or use REST for live progress")
SEGMENT_HEADER = "x-style-segment-seconds"  # the jobs service's: end with a checkpoint after this many seconds
JOBS_API = ("submit it to the jobs API (POST /jobs), which runs a job as segments of a request's time each and "
            "may ask up to")


class Segment(NamedTuple):
    """A request run as one segment of a longer run (style_engine/segments.py)."""

    seconds: float | None  # when set, the request ends with a checkpoint once this much time has passed
    resume: Checkpoint | None  # the previous segment's checkpoint, to go on from


class Prepared(NamedTuple):
    job: StyleJob  # its images at the sizes the optimisation uses
    output: OutputParams
    segment: Segment | None = None


class Preparation:
    """The worker's checks and capacity: its settings, extractor and presets, its device, the bytes requests
    may use there (`memory_budget`), its measured speed and the longest a request may take (`time_cap`)."""

    def __init__(self, config: ServerConfig, extractor: VGGFeatures, presets: PresetLibrary, device: torch.device,
                 memory_budget: int, speed: DeviceSpeed, time_cap: float):
        self.config, self.extractor, self.presets, self.device = config, extractor, presets, device
        self.memory_budget, self.speed, self.time_cap = memory_budget, speed, time_cap

    @classmethod
    def on_worker(cls, config: ServerConfig, model_dir: str, extractor: VGGFeatures,
                  device: torch.device) -> "Preparation":
        """The worker's, once its extractor is on `device`: the archive's presets, the memory and the time."""
        presets = PresetLibrary.load(os.path.join(model_dir, ARCHIVE_DIR), config.max_image_pixels)
        # after the weights are on the device: what is free then is what requests may use
        memory_budget = config.memory_budget_bytes or int(free_bytes(device) * (1 - config.memory_margin))
        # the device's speed, timed here on the worker's own device: the time model's unit (style_engine/cost.py)
        speed = measure_speed(extractor, device)
        # the longest a request may take, all its work included: the server's max_seconds maximum
        time_cap = min(config.seconds_per_call, config.maxima.get("max_seconds", math.inf))
        return cls(config, extractor, presets, device, memory_budget, speed, time_cap)

    def describe(self) -> dict:
        """What requests may use here, as the model's description reports it."""
        return {"presets": self.presets.describe(),
                "parameters": describe_params(self.config.defaults, self.config.maxima),
                "limits": {**self.config.limits(), "memory_budget_bytes": self.memory_budget,
                           "device_speed": self.speed.describe()}}

    def prepare(self, row: dict, grpc: bool, decoding: DecodingBudget | None = None,
                headers: dict | None = None) -> Prepared:
        """Request `row` of a call, parsed and checked up to the point where only the optimisation is left.
        `decoding`: what this call may still decode (a budget of its own when not given); `headers`: the
        request's (the jobs service's segments are told by theirs)."""
        config = self.config
        request = parse_request(row, config.max_styles)
        seconds = self._segment_seconds(headers or {})
        is_job = seconds is not None and job_key(headers) is not None
        style_params, output = self._parse_params(request.params, is_job)
        if grpc and output.stream:
            raise ParamError("stream", GRPC_STREAM_REFUSED)
        if seconds is not None and not output.stream:
            raise ParamError("stream", "a segment (X-Style-Segment-Seconds) answers as a stream: send stream=true")
        job = decode_request(request, style_params, self.presets, config.max_image_pixels,
                             decoding or DecodingBudget(config.max_decoded_pixels_per_call))
        check_job(job, self.extractor, config.max_style_pixels, config.max_styles)
        shrunk = shrink_to_need(job)  # what waits for its batch holds megabytes, not gigabytes
        check_answer_size(job, output, config.max_response_size)
        passes = admit(shrunk, self.device, self.memory_budget, config.save_memory)
        self._admit_time(shrunk, passes)
        resume = None if request.checkpoint is None else decode_checkpoint(request.checkpoint)
        if resume is not None:
            check_resume(resume, scale_sizes([shrunk], output_size(shrunk)), style_params.steps)
        segmented = seconds is not None or resume is not None
        return Prepared(shrunk, output, Segment(seconds, resume) if segmented else None)

    def _parse_params(self, raw: dict, is_job: bool):
        """The parameters, within a job's maxima for the jobs service's segments; a direct request that asks
        more than a direct one may, but what a job may, is a 413 that names the jobs API."""
        config = self.config
        try:
            return parse_params(raw, defaults=config.defaults,
                                maxima=config.maxima_of_jobs if is_job else config.maxima)
        except ParamError as refused:
            if is_job or refused.field not in config.job_maxima:
                raise
            try:
                parse_params(raw, defaults=config.defaults, maxima=config.maxima_of_jobs)
            except ParamError:
                raise refused from None  # not even a job may: the direct request's limits are its answer
            name = refused.field
            raise TooLargeError(name, f"{refused} in a direct request: {JOBS_API} {name} "
                                      f"{config.maxima_of_jobs[name]:g}") from None

    def _segment_seconds(self, headers: dict) -> float | None:
        """X-Style-Segment-Seconds, more than 0, within a request's time here (a longer one is cut to it); None
        when not sent."""
        value = next((value for name, value in headers.items()
                      if isinstance(name, str) and name.lower() == SEGMENT_HEADER), None)
        if value is None:
            return None
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 < seconds < math.inf:
            raise ParamError("X-Style-Segment-Seconds", f"X-Style-Segment-Seconds must be a number greater than 0; "
                                                        f"got {value!r}")
        return min(seconds, self.time_cap)

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

    def fit_as_they_are(self, jobs: list[StyleJob]) -> bool:
        """Whether these jobs fit the memory budget optimised together with full passes, not checkpointed (or
        with the localized passes they ask for)."""
        return fitting_mode(jobs, self.device, self.memory_budget, save_memory=False) is not None

    def passes(self, jobs: list[StyleJob]) -> Passes:
        """How a group runs: a batch only where its jobs fit as they are (groups), a job alone as admit chose."""
        return fitting_mode(jobs, self.device, self.memory_budget, self.config.save_memory)

    def groups(self, prepared: dict[int, Prepared]) -> list[Group]:
        """The prepared requests (by index) in groups that can each be optimised as one batch (the same
        settings and output size, within the memory budget as they are; a request that needs checkpointing or
        localized passes to fit runs alone), with what each costs here."""
        def jobs(indices) -> list[StyleJob]:
            return [prepared[index].job for index in indices]

        # a segment runs alone: it resumes from, or ends with, a checkpoint of its own
        keys = {index: (batch_key(p.job), output_size(p.job), p.segment and index) for index, p in prepared.items()}
        return [self._group(tuple(indices), jobs(indices))
                for indices in batches(keys, lambda indices: self.fit_as_they_are(jobs(indices)))]

    def _group(self, indices: tuple[int, ...], jobs: list[StyleJob]) -> Group:
        cost = group_cost(jobs, self.device, self.speed, self.passes(jobs))
        return Group(indices, cost.fixed, cost.reserved, cost.past_deadline, cost.iterations)
