"""The per-request optimisation: a target image, coarse to fine, through the frozen extractor.

stylize()       one request
stylize_batch() several requests of the same output size and settings, optimised together in one batch
Progress goes to an optional callback; the engine never prints, saves or exits.
"""

import contextlib
import functools
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from .color import keep_content_chroma
from .lbfgs import BatchedLBFGS
from .localized import LocalizedPass
from .losses import Losses, StyleObjective
from .params import StyleParams
from .precision import extractor_precision, pass_precision, use_bf16
from .resize import fit_longer_side, resample, resize
from .segments import OPTIMIZER_STATE_BYTES, Checkpoint, check_resume
from .stages import FINAL_LOSS, FINER_START, INITIAL_LOSS, ITERATION, PREPARE, START_LOSS, mark
from .targets import (GramCache, StyleJob, build_objective, check_job, output_size, shrink_to_need, smallest_side,
                      style_keys, style_size)
from .vgg import VGGFeatures

# Fields that may differ between the jobs of one batch: they only change a job's own targets or start image.
PER_JOB_FIELDS = frozenset({"style_blend", "presets", "style_scale", "init", "seed", "preserve_color"})
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
GPU_SYNC_EVERY = 10  # iterations between reads of the losses on a GPU (progress, early stop); 1 on the CPU


@dataclass(frozen=True)
class Progress:
    """One optimiser iteration of one image, as passed to the progress callback."""

    step: int  # iterations this image has done, over all scales
    steps: int  # iteration budget over all scales (early stopping may end sooner)
    scale: int  # 1-based index of the current scale
    scales: int
    size: tuple[int, int]  # (height, width) being optimised at this scale
    loss: dict[str, float]  # content, style, tv, total of `image`
    seconds: float  # since the request's optimisation began
    image: torch.Tensor  # (3, h, w) the best image so far at this scale: a view, copy it to keep it
    item: int = 0  # index of the image in its batch


@dataclass(frozen=True)
class StyleResult:
    image: torch.Tensor  # (3, H, W) float32 in [0, 1] on the CPU
    steps: int  # iterations run for this image
    seconds: float
    initial_loss: dict[str, float]  # of the initial image at the output size
    final_loss: dict[str, float]  # of the returned image before any colour preservation
    stop_reason: str  # "steps" (budget used), "converged", "max_seconds", "target_loss", "canceled" or "segment"
    precision: str  # the activations' precision the optimisation ran in: "fp32" or "bf16"
    checkpoint: Checkpoint | None = None  # where a suspended run stopped (stop reason "segment"): resume from it

    @property
    def stopped_early(self) -> bool:
        """True when the time budget cut the optimisation short: the image is the best found by then."""
        return self.stop_reason == "max_seconds"


def batch_key(job: StyleJob) -> tuple:
    """Jobs with the same key (and output size) can share a batch, being one stacked objective: the same
    parameters but for PER_JOB_FIELDS, and the same shape of style targets. Without masks that is one blended
    Gram per image, whatever its number of styles; with masks, one guided Gram and mask per style, so only
    jobs with masks and as many styles go together."""
    settings = tuple(getattr(job.params, f.name) for f in fields(job.params) if f.name not in PER_JOB_FIELDS)
    return settings, len(job.styles) if job.masks else None


def stylize(extractor: VGGFeatures, content: torch.Tensor, styles, params: StyleParams, *, masks=(),
            init_image: torch.Tensor | None = None, **options) -> StyleResult:
    """Stylise one content image (3, H, W) in [0, 1] with one or more style images, optionally each in the
    region of its mask (1, H, W); see StyleJob and stylize_batch."""
    job = StyleJob(content, tuple(styles), params, tuple(masks), init_image)
    return stylize_batch(extractor, [job], **options)[0]


def stylize_batch(extractor: VGGFeatures, jobs: list[StyleJob], *,
                  callback: Callable[[Progress], None] | None = None, stop_below: float | None = None,
                  gram_cache: GramCache | None = None, deadline: float | None = None,
                  checkpoint: bool = False, should_stop: Callable[[int], bool] | None = None,
                  tile: int | None = None, resume: Checkpoint | None = None,
                  suspend: Callable[[], bool] | None = None) -> list[StyleResult]:
    """Optimise one target image per job, all in one batch through the extractor.

    Jobs must share `batch_key` and output size. Each image stops by its own budget and convergence, as it
    would alone (a stopped image is held still while the others go on). `stop_below` ends the optimisation once
    every image's total loss at the output size, in float32, is at or below it (benchmarks time reaching a
    given loss with it). `gram_cache` keeps style Grams across calls. `deadline`, a time.perf_counter() value,
    ends the optimisation then at the latest, whatever the jobs' max_seconds. `checkpoint` runs VGG19's blocks
    again in each backward pass instead of keeping their activations: the same results, in about a third
    more time and less memory (memory.py). `should_stop(item)`, asked before each iteration for every image
    still running, stops that image for good when true (stop reason "canceled": its best image so far, brought
    to the output size, is its result); it must be cheap. `tile`, where set, runs every pass over an image it
    splits by tiles of at most that many pixels a side (localized.py): the same results, the memory of a tile's
    pass (memory.py), in more time.

    Segments (segments.py), for a batch of one: `suspend()`, asked before each iteration once the request has
    run one, ends the optimisation where it is when true, with iterations left: the result's stop reason is then
    "segment" and its `checkpoint` says where it stopped (its image is the checkpoint's, at that scale). `resume`
    goes on from such a checkpoint: at its scale, its iteration count, its time spent (max_seconds counts over
    the whole run) and its initial losses, so that the segments report as one run.
    """
    start = time.perf_counter() - (resume.seconds if resume else 0.0)
    with mark(PREPARE):
        jobs, style_keys = _on_device(jobs, extractor.mean.device, keyed=gram_cache is not None)
    output = _check_batch(jobs, extractor)
    if resume is not None:
        if len(jobs) != 1:
            raise ValueError("a run resumes from a checkpoint alone, in a batch of one")
        check_resume(resume, scale_sizes(jobs, output), jobs[0].params.steps)
    run = _Run(extractor, jobs, output, start, callback, stop_below, gram_cache, style_keys, deadline, checkpoint,
               should_stop, tile, suspend)
    init_full = torch.stack([_initial_image(job, output) for job in jobs])
    # A float32 run that starts at the output size evaluates the initial image first anyway: no second pass.
    evaluated_first = resume is not None or (not run.bf16 and scale_sizes(jobs, output)[0] == output)
    initial = None if evaluated_first else run.float32_losses(init_full, INITIAL_LOSS)
    x, best = _coarse_to_fine(run, init_full, output, resume)
    initial = initial or run.first_losses  # a float32 run from the output size: its first evaluation's losses
    initial_losses = [resume.initial_loss] if resume else [initial.as_floats(i) for i in range(len(jobs))]
    if run.suspended is not None:
        return [_suspended(run, best, initial_losses[0])]
    final = best if best is not None and not run.bf16 else run.confirmed or run.float32_losses(x, FINAL_LOSS)
    seconds = time.perf_counter() - start
    return [
        StyleResult(image=_finish(job, x[i]), steps=run.steps_done[i], seconds=seconds,
                    initial_loss=initial_losses[i], final_loss=final.as_floats(i),
                    stop_reason=run.stop_reasons[i], precision="bf16" if run.bf16 else "fp32")
        for i, job in enumerate(jobs)
    ]


def _check_batch(jobs: list[StyleJob], extractor: VGGFeatures) -> tuple[int, int]:
    for job in jobs:
        check_job(job, extractor)
    key, output = batch_key(jobs[0]), output_size(jobs[0])
    if any(batch_key(job) != key or output_size(job) != output for job in jobs):
        raise ValueError("jobs of one batch must share output size and batch_key")
    return output


def _coarse_to_fine(run: "_Run", init_full: torch.Tensor, output: tuple[int, int], resume: Checkpoint | None):
    """Optimise at each scale in turn (from the checkpoint's, when resuming); returns the output-size images and
    their losses, or, when the run is suspended, the images where it stopped."""
    x, size = None, None
    sizes = scale_sizes(run.jobs, output)
    for index, scale_size in enumerate(sizes):
        if resume is not None and index < resume.scale:
            continue
        if run.suspended is not None:
            break
        if resume is not None and index == resume.scale:  # goes on from the checkpoint's image, at its scale
            x0 = resume.image[None].to(init_full.device)
            run.steps_done, run.resumed = [resume.steps], resume
            x, best = run.optimise(run.objective(scale_size, first_images=x0), x0, index, sizes)
        elif x is not None and run.all_canceled:  # nothing left to optimise: carry the images up to the output size
            x, best = upsampled_start(x, scale_size), None
        elif x is None:  # the first scale's start may be the content, whose pass then gives the content target
            x0 = resize(init_full, scale_size)
            x, best = run.optimise(run.objective(scale_size, first_images=x0), x0, index, sizes)
        else:
            objective = run.objective(scale_size)
            x0, evaluated = finer_start(run, objective, x, init_full, size, scale_size)
            x, best = run.optimise(objective, x0, index, sizes, evaluated)
        size = scale_size
    return x, best


def finer_start(run: "_Run", objective: StyleObjective, coarse: torch.Tensor, init_full: torch.Tensor,
                coarse_size: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, Losses | None]:
    """Where a finer scale starts, per image the lower in loss of two candidates, so that it never starts above
    the coarse result: the coarse result upsampled, and what the coarser scale changed carried onto this
    scale's own start (sharper where the start is the content, but noise again where it is noise). Measured
    against either alone in benchmarks/coarse_to_fine_start.py. A request whose time is up spends nothing on
    it: it goes on from the upsampled result, unevaluated.

    Returns the start and, where it comes with its first iteration's pass done, that pass's losses (the start
    is then a leaf whose gradient is filled). The candidate likelier to win (the carried change, unless an
    image starts from noise, which it would bring back) goes first, with its gradient: its forward pass is held
    while the other's runs without, layer by layer, only as far as it takes to tell that the other's loss is
    higher (StyleObjective.total_unless_above; with the style terms of the first layers, usually). Then the
    held pass is the scale's first iteration's, and the choice costs the other's first layers. When the other
    wins for an image, its whole pass runs, the held one is dropped, and the choice costs two forward passes."""
    if time.perf_counter() >= run.end:
        return upsampled_start(coarse, size), None
    upsampled, carried = upsampled_start(coarse, size), carried_start(coarse, init_full, coarse_size, size)
    noise = any(job.params.init == "noise" for job in run.jobs)
    likelier, other = (upsampled, carried) if noise else (carried, upsampled)
    start = likelier.clone().requires_grad_(True)
    if run.localized(objective, start):  # by tiles no pass is held: the likelier's runs whole, with its gradient
        losses = run.evaluate(objective, start, grad=True)
        with mark(FINER_START, other):
            carried_wins = _carried_wins(losses.total, run.evaluate(objective, other, grad=False).total, noise)
        if bool((carried_wins != noise).all()):
            return start, losses
    else:
        with run.loss_pass(objective, start, grad=True) as losses:
            likelier_loss = losses.total.detach()
            with mark(FINER_START, other):
                carried_wins = _carried_wins(likelier_loss, run.total_unless_above(objective, other, likelier_loss),
                                             noise)
            if bool((carried_wins != noise).all()):
                losses.total.sum().backward()
                return start, losses.detached()
    return torch.where(carried_wins[:, None, None, None], carried, upsampled), None


def _carried_wins(likelier_loss: torch.Tensor, other_loss: torch.Tensor, noise: bool) -> torch.Tensor:
    """Per image, whether the carried start's loss is the lower (the likelier is the carried one unless `noise`)."""
    carried_loss, upsampled_loss = (other_loss, likelier_loss) if noise else (likelier_loss, other_loss)
    return carried_loss < upsampled_loss


def upsampled_start(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The coarse result resampled to `size`: its loss there is what the finer scale must improve on."""
    return resize(coarse, size)


def carried_start(coarse: torch.Tensor, init_full: torch.Tensor, coarse_size: tuple[int, int],
                  size: tuple[int, int]) -> torch.Tensor:
    """The start image at `size` plus what the coarser scale changed; the change is signed: resampled without
    clamping, or every darkening would be lost."""
    return (resize(init_full, size) + resample(coarse - resize(init_full, coarse_size), size)).clamp(0, 1)


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
    """State shared by the scales of one optimisation: objectives, clock, reporting, and per image the
    iterations done and why it stopped."""

    def __init__(self, extractor, jobs, output, start, callback, stop_below, gram_cache, style_keys, deadline,
                 checkpoint, should_stop, tile, suspend):
        self.extractor, self.jobs, self.output, self.params = extractor, jobs, output, jobs[0].params
        self.checkpoint, self.tile = checkpoint, tile
        self.start, self.callback, self.stop_below, self.should_stop = start, callback, stop_below, should_stop
        self.gram_cache, self.style_keys = gram_cache, style_keys
        budget_end = math.inf if self.params.max_seconds is None else start + self.params.max_seconds
        self.end = min(budget_end, math.inf if deadline is None else deadline)
        device = extractor.mean.device
        self.bf16 = use_bf16(self.params.precision, device, output[0] * output[1])
        self.sync_every = 1 if device.type == "cpu" else GPU_SYNC_EVERY
        self.steps_done = [0] * len(jobs)
        self.stop_reasons = ["steps"] * len(jobs)
        self.confirmed: Losses | None = None  # float32 losses of the images that met stop_below
        self.first_losses: Losses | None = None  # of the first images evaluated
        self._objectives: dict[tuple, StyleObjective] = {}
        self.suspend, self.iterated = suspend, False  # iterated: whether this request has run an iteration
        self.resumed: Checkpoint | None = None  # the checkpoint of the scale to resume, until it starts
        self.suspended: tuple[int, int, _Scale] | None = None  # where it stopped: scale index, its end, its state

    @property
    def all_canceled(self) -> bool:
        return all(reason == "canceled" for reason in self.stop_reasons)

    def objective(self, size: tuple[int, int], bf16: bool | None = None,
                  first_images: torch.Tensor | None = None) -> StyleObjective:
        """The objective at `size`, built once (its targets are computed once per request and scale); the
        caller that builds it names the images it evaluates first (targets.build_objective)."""
        bf16 = self.bf16 if bf16 is None else bf16
        if (size, bf16) not in self._objectives:
            self._objectives[size, bf16] = build_objective(self.extractor, self.jobs, size, self.output, bf16,
                                                           self.gram_cache, self.style_keys, first_images, self.tile)
        return self._objectives[size, bf16]

    def evaluate(self, objective: StyleObjective, x: torch.Tensor, grad: bool, bf16: bool | None = None) -> Losses:
        """Losses of images x; with grad=True also fills x.grad. By tiles where `tile` splits x (localized.py)."""
        if self.localized(objective, x):
            bf16 = self.bf16 if bf16 is None else bf16
            localized = LocalizedPass(objective, functools.partial(self._features, bf16=bf16), self.tile)
            with pass_precision(bf16):
                return localized.evaluate(x, grad)
        with self.loss_pass(objective, x, grad, bf16) as losses:
            if grad:
                losses.total.sum().backward()  # a sum keeps each image's gradient its own
        return losses.detached()

    @contextlib.contextmanager
    def loss_pass(self, objective: StyleObjective, x: torch.Tensor, grad: bool, bf16: bool | None = None):
        """The losses of images x, with their graph where grad is True, for a backward pass within the context
        (in the pass's precision: float32's covers the backward pass too)."""
        bf16 = self.bf16 if bf16 is None else bf16
        with torch.set_grad_enabled(grad), pass_precision(bf16):
            features = self._features(x, objective.layers, bf16)
            objective.take_content_target(x, features)
            losses = objective(features, x)
            del features  # the loss keeps what its backward pass needs; the rest may go before that pass
            yield losses

    def _features(self, x: torch.Tensor, layers, bf16: bool) -> dict[str, torch.Tensor]:
        """The extractor's activations of images x on `layers`, in the activations' precision."""
        with extractor_precision(x.device, bf16):
            return self.extractor(x, layers, self.params.pooling, checkpoint=self.checkpoint)

    def localized(self, objective: StyleObjective, x: torch.Tensor) -> bool:
        """Whether passes over images x go by tiles."""
        return LocalizedPass.splits(tuple(x.shape[-2:]), self.tile, objective.layers)

    def total_unless_above(self, objective: StyleObjective, x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """objective.total_unless_above for images x, in the run's precision, without gradients."""
        with torch.no_grad(), pass_precision(self.bf16), extractor_precision(x.device, self.bf16):
            stream = self.extractor.stream(x, objective.layers, self.params.pooling)
            return objective.total_unless_above(stream, x, bound)

    def float32_losses(self, x: torch.Tensor, stage: str) -> Losses:
        """The seed's loss of output-size images x in float32: what is reported, whatever optimised. `stage`
        names the work in a profile (stages.py). The first caller builds the objective: x is what it evaluates
        first."""
        objective = self.objective(self.output, bf16=False, first_images=x)
        with mark(stage, x):
            return self.evaluate(objective, x, grad=False, bf16=False)

    def optimise(self, objective, x0, scale_index: int, sizes: list,
                 evaluated: Losses | None = None) -> tuple[torch.Tensor, Losses]:
        """Run this scale's share of each image's iterations; returns the best images seen and their losses.
        `evaluated`: the losses of x0 where its first iteration's pass is done (finer_start)."""
        scales, final_scale = len(sizes), scale_index == len(sizes) - 1
        # each image's share of what it has left: what a coarse scale leaves unused goes on to the next
        budgets = [0 if reason == "canceled" else (self.params.steps - done) // (scales - scale_index)
                   for done, reason in zip(self.steps_done, self.stop_reasons)]
        if self.resumed is not None:  # resumed within this scale: its share as the suspended run had it
            budgets = [self.resumed.scale_until - self.steps_done[0]]
        scale_until = self.steps_done[0] + budgets[0]
        scale = _Scale(x0, self.params, budgets, with_gradient=evaluated is not None)
        if self.resumed is not None and isinstance(scale.optimizer, BatchedLBFGS):
            scale.optimizer.restore(self.resumed.optimizer)
        self.resumed = None
        deadline = self._deadline(sizes[scale_index:])
        pending = evaluated  # the first iteration's pass, done already
        for _ in range(max(budgets)):
            if time.perf_counter() >= deadline:
                self._stop(scale.stop_all(), "max_seconds", final_scale)
                break
            if self._cancel(scale) and not scale.any_active:
                break
            if self.iterated and self.suspend is not None and self.suspend():
                self.suspended = scale_index, scale_until, scale
                break
            self.iterated = True
            with mark(ITERATION, scale.x):
                losses, pending = pending or self.evaluate(objective, scale.x, grad=True), None
                self.first_losses = self.first_losses or losses
                scale.step(losses)
            for item in scale.stepped:
                self.steps_done[item] += 1
            if not scale.sync_due(self.sync_every):
                continue  # on a GPU, reading losses back every step would stall it: read them in groups
            scale.read_back()  # the loop's one host sync; L-BFGS needs none of its own
            self._report(scale, scale_index, scales)
            if final_scale and self._target_reached(scale):
                self._stop(scale.stop_all(), "target_loss", final_scale)
                break
            self._stop(scale.stop_converged(), "converged", final_scale)
            if not scale.any_active:
                break
        if scale.best is None:  # no iteration ran: the start's losses
            with mark(START_LOSS, x0):
                scale.best = evaluated or self.evaluate(objective, x0, grad=False)
            self.first_losses = self.first_losses or scale.best
        return scale.best_x, scale.best

    def _cancel(self, scale: "_Scale") -> bool:
        """Stop, at any scale and for good, the running images that should_stop asks to; whether any."""
        if self.should_stop is None:
            return False
        canceled = scale.stop([item for item, active in enumerate(scale.active) if active and self.should_stop(item)])
        for item in canceled:
            self.stop_reasons[item] = "canceled"
        return bool(canceled)

    def _stop(self, items: list[int], reason: str, final_scale: bool) -> None:
        """At the output size, record why these images stopped; at a coarser scale they just go on to the next."""
        if final_scale:
            for item in items:
                self.stop_reasons[item] = reason

    def _target_reached(self, scale: "_Scale") -> bool:
        """Every image at or below stop_below, confirmed in float32 when optimising in bf16."""
        if self.stop_below is None or max(scale.history[-1]) > self.stop_below:
            return False
        if not self.bf16:
            return True
        losses = self.float32_losses(scale.best_x, FINAL_LOSS)
        if max(losses.total.tolist()) > self.stop_below:
            return False
        self.confirmed = losses
        return True

    def _deadline(self, sizes: list[tuple[int, int]]) -> float:
        """When this scale, sizes[0], must stop: of the time left it gets its share of the pixels still to
        optimise, which is also its share of the time under the even split of iterations (an iteration costs
        about its pixels). A half each, as first tried, made coarse to fine lose to one scale under a budget."""
        if self.end == math.inf:
            return math.inf
        now = time.perf_counter()
        pixels = [height * width for height, width in sizes]
        return now + (self.end - now) * pixels[0] / sum(pixels)

    def _report(self, scale: "_Scale", scale_index: int, scales: int) -> None:
        if self.callback is None:
            return
        seconds = time.perf_counter() - self.start
        for item in range(len(self.jobs)):
            self.callback(Progress(step=self.steps_done[item], steps=self.params.steps, scale=scale_index + 1,
                                   scales=scales, size=tuple(scale.x.shape[-2:]), loss=scale.best.as_floats(item),
                                   seconds=seconds, image=scale.best_x[item], item=item))


class _Scale:
    """The optimisation of a batch of images at one scale: the images, their optimiser, the best image of each
    so far, and which images still run. A stopped image is held where it is and its best kept, so that it ends
    as it would have alone; its gradient is still computed with the others' (the batch keeps its shape)."""

    def __init__(self, x0: torch.Tensor, params: StyleParams, budgets: list[int], with_gradient: bool = False):
        """`with_gradient`: x0 is a leaf whose gradient its first iteration's pass has filled (finer_start)."""
        self.params, self.budgets = params, budgets
        self.x = x0 if with_gradient else x0.clone().requires_grad_(True)
        self.optimizer = _optimizer(params, self.x)
        self.best_x, self.best = x0.detach(), None
        self.active = [budget > 0 for budget in budgets]
        self.iterations = 0
        self.stepped: list[int] = []  # the images the latest step moved
        self.history: list[list[float]] = []  # best total loss of every image after each iteration, read back
        self.pending: list[torch.Tensor] = []  # the same, not yet read back

    @property
    def any_active(self) -> bool:
        return any(self.active)

    def step(self, losses: Losses) -> None:
        """Keep each running image's best, then move the running images one optimiser step."""
        running = None if all(self.active) else torch.tensor(self.active, device=self.x.device)
        self.best_x, self.best = _keep_best(self.x.detach(), losses, self.best_x, self.best, running)
        held = None if running is None else self.x.detach().clone()
        self.optimizer.step()
        with torch.no_grad():
            self.x.clamp_(0, 1)
            if held is not None:
                self.x.copy_(torch.where(running[:, None, None, None], self.x, held))
        self.x.grad = None
        self.iterations += 1
        self.stepped = [item for item, active in enumerate(self.active) if active]
        for item in self.stepped:
            self.active[item] = self.iterations < self.budgets[item]
        self.pending.append(self.best.total)

    def sync_due(self, sync_every: int) -> bool:
        """Read back every sync_every iterations, and whenever an image has just used up its budget."""
        return len(self.pending) >= sync_every or any(self.iterations == self.budgets[i] for i in self.stepped)

    def read_back(self) -> None:
        self.history += torch.stack(self.pending).tolist()
        self.pending = []

    def stop_all(self) -> list[int]:
        """Stop every running image; returns which."""
        return self.stop([item for item, active in enumerate(self.active) if active])

    def stop(self, items: list[int]) -> list[int]:
        """Stop these images; returns them."""
        for item in items:
            self.active[item] = False
        return items

    def stop_converged(self) -> list[int]:
        """Stop the running images whose best loss improved by less than early_stop_tol (relative) over the last
        early_stop_window iterations; returns which."""
        tolerance, window = self.params.early_stop_tol, self.params.early_stop_window
        if tolerance <= 0 or len(self.history) <= window:
            return []
        old, new = self.history[-1 - window], self.history[-1]
        stopped = [item for item, active in enumerate(self.active)
                   if active and old[item] - new[item] <= tolerance * abs(old[item])]
        for item in stopped:
            self.active[item] = False
        return stopped


def _optimizer(params: StyleParams, x: torch.Tensor):
    lr = params.lr if params.lr is not None else DEFAULT_LR[params.optimizer]
    if params.optimizer == "lbfgs":
        return BatchedLBFGS(x, lr=lr)
    return torch.optim.Adam([x], lr=lr)


def _keep_best(x: torch.Tensor, losses: Losses, best_x: torch.Tensor, best: Losses | None,
               running: torch.Tensor | None):
    """Per image, keep whichever of (x, losses) and (best_x, best) has the lower total, only for the images
    `running` (a (B,) bool mask, None for all) marks; no host sync."""
    if best is None:
        return x.clone(), losses
    better = losses.total < best.total  # (B,)
    if running is not None:
        better &= running
    best_x = torch.where(better[:, None, None, None], x, best_x)
    return best_x, Losses(*(torch.where(better, new, old) for new, old in zip(losses.terms(), best.terms())))


def _on_device(jobs: list[StyleJob], device: torch.device, keyed: bool):
    """The jobs with their images reduced to what the optimisation uses and moved to `device`, and, when
    `keyed`, the digests that key each job's style Grams in a GramCache: taken here, once per request, from
    the images still on the host."""
    jobs = [shrink_to_need(job) for job in jobs]  # before the copy to the device: less to copy
    keys = [style_keys(job) for job in jobs] if keyed else None
    moved = [replace(job, content=_to(job.content, device), styles=tuple(_to(s, device) for s in job.styles),
                     masks=tuple(_to(mask, device) for mask in job.masks), init_image=_to(job.init_image, device))
             for job in jobs]
    return moved, keys


def _to(image: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if image is None else image.to(device, torch.float32)


def _initial_image(job: StyleJob, size: tuple[int, int]) -> torch.Tensor:
    if job.params.init == "content":
        return resize(job.content, size)
    if job.params.init == "style":
        return resize(job.styles[0], size)  # stretched to the output's shape
    if job.params.init == "image":
        return resize(job.init_image, size)  # likewise
    generator = torch.Generator().manual_seed(job.params.seed)  # on the CPU: the same noise on every device
    return torch.rand((3, *size), generator=generator).to(job.content.device)


def _suspended(run: _Run, best: Losses, initial_loss: dict[str, float]) -> StyleResult:
    """The result of a run suspended with iterations left: its checkpoint, and its image at that scale."""
    index, scale_until, scale = run.suspended
    seconds = time.perf_counter() - run.start
    image = scale.x[0].detach().float().cpu()
    state = scale.optimizer.state(OPTIMIZER_STATE_BYTES) if isinstance(scale.optimizer, BatchedLBFGS) else {}
    checkpoint = Checkpoint(image=image, scale=index, scales=len(scale_sizes(run.jobs, run.output)),
                            scale_until=scale_until, steps=run.steps_done[0], seconds=seconds,
                            initial_loss=initial_loss, loss=best.as_floats(0),
                            optimizer={name: tensor.float().cpu() for name, tensor in state.items()})
    return StyleResult(image=image, steps=run.steps_done[0], seconds=seconds, initial_loss=initial_loss,
                       final_loss=checkpoint.loss, stop_reason="segment",
                       precision="bf16" if run.bf16 else "fp32", checkpoint=checkpoint)


def _finish(job: StyleJob, image: torch.Tensor) -> torch.Tensor:
    image = image.detach()
    if job.params.preserve_color == "luminance":
        image = keep_content_chroma(image, resize(job.content, image.shape[-2:]))
    return image.float().cpu()

