"""The per-request optimisation: a target image, coarse to fine, through the frozen extractor.

stylize()       one request
stylize_batch() several requests of the same output size and settings, optimised together in one batch
Progress goes to an optional callback; the engine never prints, saves or exits.
"""

import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .color import keep_content_chroma
from .lbfgs import BatchedLBFGS
from .losses import Losses, StyleObjective
from .params import StyleParams
from .precision import extractor_precision, use_bf16
from .resize import fit_longer_side, resize
from .targets import (GramCache, StyleJob, build_objective, check_job, output_size, shrink_to_need, smallest_side,
                      style_size)
from .vgg import VGGFeatures

# Fields that may differ between the jobs of one batch: they only change a job's own targets or start image.
PER_JOB_FIELDS = frozenset({"style_blend", "style_scale", "init", "seed", "preserve_color"})
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
LBFGS_HISTORY = 20  # curvature pairs kept per image; more helped no faster in benchmarks/ and costs memory
GPU_SYNC_EVERY = 10  # iterations between reads of the losses on a GPU (progress, early stop); 1 on the CPU


@dataclass(frozen=True)
class Progress:
    """One optimiser iteration of one image, as passed to the progress callback."""

    step: int  # iterations done, over all scales
    steps: int  # iteration budget over all scales (early stopping may end sooner)
    scale: int  # 1-based index of the current scale
    scales: int
    size: tuple[int, int]  # (height, width) being optimised at this scale
    loss: dict[str, float]  # content, style, tv, total of the best image so far at this scale
    seconds: float  # since the request's optimisation began
    image: torch.Tensor  # (3, h, w) the image being optimised, after this iteration: a view, copy it to keep it
    item: int = 0  # index of the image in its batch


@dataclass(frozen=True)
class StyleResult:
    image: torch.Tensor  # (3, H, W) float32 in [0, 1] on the CPU
    steps: int  # iterations run
    seconds: float
    initial_loss: dict[str, float]  # of the initial image at the output size
    final_loss: dict[str, float]  # of the returned image before any colour preservation
    stop_reason: str  # "steps" (budget used), "converged", "max_seconds" or "target_loss"

    @property
    def stopped_early(self) -> bool:
        """True when the time budget cut the optimisation short: the image is the best found by then."""
        return self.stop_reason == "max_seconds"


def batch_key(params: StyleParams) -> tuple:
    """Jobs whose parameters give the same key (and whose outputs have the same size) can share a batch."""
    return tuple(getattr(params, f.name) for f in fields(params) if f.name not in PER_JOB_FIELDS)


def stylize(extractor: VGGFeatures, content: torch.Tensor, styles, params: StyleParams, *,
            callback: Callable[[Progress], None] | None = None, stop_below: float | None = None,
            gram_cache: GramCache | None = None) -> StyleResult:
    """Stylise one content image (3, H, W) in [0, 1] with one or more style images; see stylize_batch."""
    return stylize_batch(extractor, [StyleJob(content, tuple(styles), params)], callback=callback,
                         stop_below=stop_below, gram_cache=gram_cache)[0]


def stylize_batch(extractor: VGGFeatures, jobs: list[StyleJob], *,
                  callback: Callable[[Progress], None] | None = None, stop_below: float | None = None,
                  gram_cache: GramCache | None = None) -> list[StyleResult]:
    """Optimise one target image per job, all in one batch through the extractor.

    Jobs must share `batch_key` and output size. `stop_below` ends the optimisation once every image's total
    loss at the output size, in float32, is at or below it (benchmarks time reaching a given loss with it).
    `gram_cache` keeps style Grams across calls.
    """
    start = time.perf_counter()
    jobs = [_on_device(job, extractor.mean.device) for job in jobs]
    output = _check_batch(jobs, extractor)
    run = _Run(extractor, jobs, output, start, callback, stop_below, gram_cache)
    init_full = torch.stack([_initial_image(job, output) for job in jobs])
    # A float32 run that starts at the output size evaluates the initial image first anyway: no second pass.
    evaluated_first = not run.bf16 and scale_sizes(jobs, output)[0] == output
    initial = None if evaluated_first else run.float32_losses(init_full)
    x, best = _coarse_to_fine(run, init_full, output)
    initial = initial or run.first_losses or run.float32_losses(init_full)  # the last: no iteration ran
    final = best if not run.bf16 else run.confirmed or run.float32_losses(x)
    seconds = time.perf_counter() - start
    return [
        StyleResult(image=_finish(job, x[i]), steps=run.step, seconds=seconds,
                    initial_loss=initial.as_floats(i), final_loss=final.as_floats(i), stop_reason=run.stop_reason)
        for i, job in enumerate(jobs)
    ]


def _check_batch(jobs: list[StyleJob], extractor: VGGFeatures) -> tuple[int, int]:
    for job in jobs:
        check_job(job, extractor)
    params, output = jobs[0].params, output_size(jobs[0])
    if any(batch_key(job.params) != batch_key(params) or output_size(job) != output for job in jobs):
        raise ValueError("jobs of one batch must share output size and batch_key(params)")
    return output


def _coarse_to_fine(run: "_Run", init_full: torch.Tensor, output: tuple[int, int]):
    """Optimise at each scale in turn; returns the output-size images and their losses."""
    x, size = None, None
    for index, scale_size in enumerate(sizes := scale_sizes(run.jobs, output)):
        x0 = resize(init_full, scale_size)
        if x is not None:  # carry over what the coarser scale changed, on top of this scale's own detail
            x0 = (x0 + resize(x - resize(init_full, size), scale_size)).clamp(0, 1)
        x, best = run.optimise(run.objective(scale_size), x0, index, sizes)
        size = scale_size
    return x, best


def scale_sizes(jobs: list[StyleJob], output: tuple[int, int]) -> list[tuple[int, int]]:
    """Coarse to fine: the output size halved while the longer side stays >= min_scale and every image
    (output and styles) stays large enough for the deepest layer; the output size last."""
    params, sizes = jobs[0].params, [output]
    needed = smallest_side(params)
    longer = max(output) // 2
    while longer >= params.min_scale:
        size = fit_longer_side(*output, longer)
        styles_fit = all(min(style_size(s, size, job.params.style_scale)) >= needed
                         for job in jobs for s in job.styles)
        if min(size) < needed or not styles_fit:
            break
        sizes.insert(0, size)
        longer //= 2
    return sizes


class _Run:
    """State shared by the scales of one optimisation: objectives, step count, clock, reporting, stop reason."""

    def __init__(self, extractor, jobs, output, start, callback, stop_below, gram_cache):
        self.extractor, self.jobs, self.output, self.params = extractor, jobs, output, jobs[0].params
        self.start, self.callback, self.stop_below, self.gram_cache = start, callback, stop_below, gram_cache
        device = extractor.mean.device
        self.bf16 = use_bf16(self.params.precision, device, output[0] * output[1])
        self.sync_every = 1 if device.type == "cpu" else GPU_SYNC_EVERY
        self.step, self.stop_reason = 0, "steps"
        self.confirmed: Losses | None = None  # float32 losses of the image that met stop_below
        self.first_losses: Losses | None = None  # of the first image evaluated
        self._objectives: dict[tuple, StyleObjective] = {}

    def objective(self, size: tuple[int, int], bf16: bool | None = None) -> StyleObjective:
        """The objective at `size`, built once (its targets are computed once per request and scale)."""
        bf16 = self.bf16 if bf16 is None else bf16
        if (size, bf16) not in self._objectives:
            self._objectives[size, bf16] = build_objective(self.extractor, self.jobs, size, self.output, bf16,
                                                           self.gram_cache)
        return self._objectives[size, bf16]

    def evaluate(self, objective: StyleObjective, x: torch.Tensor, grad: bool, bf16: bool | None = None) -> Losses:
        """Losses of images x; with grad=True also fills x.grad."""
        with torch.set_grad_enabled(grad):
            with extractor_precision(x.device, self.bf16 if bf16 is None else bf16):
                features = self.extractor(x, objective.layers, self.params.pooling)
            losses = objective(features, x)
            if grad:
                losses.total.sum().backward()  # a sum keeps each image's gradient its own
        return Losses(*(term.detach() for term in losses.terms()))

    def float32_losses(self, x: torch.Tensor) -> Losses:
        """The seed's loss of output-size images x in float32: what is reported, whatever optimised."""
        return self.evaluate(self.objective(self.output, bf16=False), x, grad=False, bf16=False)

    def optimise(self, objective, x0, scale_index: int, sizes: list) -> tuple[torch.Tensor, Losses]:
        """Run this scale's share of the iterations; returns the best image seen and its losses."""
        params, scales = self.params, len(sizes)
        steps = (params.steps - self.step) // (scales - scale_index)  # what a coarse scale leaves goes on
        x = x0.clone().requires_grad_(True)
        optimizer = _optimizer(params, x)
        best_x, best = x0, None
        history, pending = [], []  # best total loss after each iteration, per image; not yet read back
        final_scale = scale_index == scales - 1
        deadline = self._deadline(sizes[scale_index:])
        for iteration in range(steps):
            if time.perf_counter() >= deadline:
                self.stop_reason = "max_seconds" if final_scale else self.stop_reason
                break
            x.grad = None
            losses = self.evaluate(objective, x, grad=True)
            self.first_losses = self.first_losses or losses
            best_x, best = _keep_best(x.detach(), losses, best_x, best)
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            self.step += 1
            pending.append(best.total)
            if len(pending) < self.sync_every and iteration < steps - 1:
                continue  # on a GPU, reading losses back every step would stall it: read them in groups
            history += torch.stack(pending).tolist()  # the loop's one host sync; L-BFGS needs none of its own
            pending = []
            self._report(best, x.detach(), scale_index, scales)
            if final_scale and self._target_reached(best_x, history[-1]):
                self.stop_reason = "target_loss"
                break
            if _converged(history, params.early_stop_window, params.early_stop_tol):
                self.stop_reason = "converged" if final_scale else self.stop_reason
                break
        if best is None:  # no iteration ran at this scale
            best = self.evaluate(objective, x0, grad=False)
        return best_x, best

    def _target_reached(self, best_x: torch.Tensor, best_totals: list[float]) -> bool:
        """Every image at or below stop_below, confirmed in float32 when optimising in bf16."""
        if self.stop_below is None or max(best_totals) > self.stop_below:
            return False
        if not self.bf16:
            return True
        losses = self.float32_losses(best_x)
        if max(losses.total.tolist()) > self.stop_below:
            return False
        self.confirmed = losses
        return True

    def _deadline(self, sizes: list[tuple[int, int]]) -> float:
        """When this scale, sizes[0], must stop: of the time left it gets its share of the pixels still to
        optimise, which is also its share of the time under the even split of iterations (an iteration costs
        about its pixels). A half each, as first tried, made coarse to fine lose to one scale under a budget."""
        if self.params.max_seconds is None:
            return math.inf
        now, end = time.perf_counter(), self.start + self.params.max_seconds
        pixels = [height * width for height, width in sizes]
        return now + (end - now) * pixels[0] / sum(pixels)

    def _report(self, best: Losses, x: torch.Tensor, scale_index: int, scales: int) -> None:
        if self.callback is None:
            return
        seconds = time.perf_counter() - self.start
        for item in range(len(self.jobs)):
            self.callback(Progress(step=self.step, steps=self.params.steps, scale=scale_index + 1, scales=scales,
                                   size=tuple(x.shape[-2:]), loss=best.as_floats(item), seconds=seconds,
                                   image=x[item], item=item))


def _optimizer(params: StyleParams, x: torch.Tensor):
    lr = params.lr if params.lr is not None else DEFAULT_LR[params.optimizer]
    if params.optimizer == "lbfgs":
        return BatchedLBFGS(x, lr=lr, history=LBFGS_HISTORY)
    return torch.optim.Adam([x], lr=lr)


def _keep_best(x: torch.Tensor, losses: Losses, best_x: torch.Tensor, best: Losses | None):
    """Per image, keep whichever of (x, losses) and (best_x, best) has the lower total; no host sync."""
    if best is None:
        return x.clone(), losses
    better = losses.total < best.total  # (B,)
    best_x = torch.where(better[:, None, None, None], x, best_x)
    return best_x, Losses(*(torch.where(better, new, old) for new, old in zip(losses.terms(), best.terms())))


def _converged(history: list[list[float]], window: int, tolerance: float) -> bool:
    """True when every image's best loss improved by less than `tolerance` (relative) over `window` steps."""
    if tolerance <= 0 or len(history) <= window:
        return False
    return all(old - new <= tolerance * abs(old) for old, new in zip(history[-1 - window], history[-1]))


def _on_device(job: StyleJob, device: torch.device) -> StyleJob:
    job = shrink_to_need(job)  # before the copy to the device: less to copy
    return StyleJob(job.content.to(device, torch.float32), tuple(s.to(device, torch.float32) for s in job.styles),
                    job.params)


def _initial_image(job: StyleJob, size: tuple[int, int]) -> torch.Tensor:
    if job.params.init == "content":
        return resize(job.content, size)
    if job.params.init == "style":
        return resize(job.styles[0], size)  # stretched to the output's shape
    generator = torch.Generator().manual_seed(job.params.seed)  # on the CPU: the same noise on every device
    return torch.rand((3, *size), generator=generator).to(job.content.device)


def _finish(job: StyleJob, image: torch.Tensor) -> torch.Tensor:
    image = image.detach()
    if job.params.preserve_color == "luminance":
        image = keep_content_chroma(image, resize(job.content, image.shape[-2:]))
    return image.float().cpu()

