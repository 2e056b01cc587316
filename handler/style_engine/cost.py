"""How long a batch of requests takes, from the layer shapes and the device's measured speed, before it runs.

Beside memory.py's model of the bytes, this is the model of the seconds: the handler forms and schedules its
groups by it so that a whole call, every group's work included, ends before TorchServe gives up on the
worker, and refuses before any work a request that could not finish within the server's maximum even alone.

An optimisation's time is of two kinds:
- iterations (a forward and a backward pass through VGG19 per image): the deadline is checked before each,
  so they stop when time runs out, at most one iteration late;
- fixed work that no deadline interrupts, pass by pass as optimize.py runs them (stages.py names them): at
  each scale every style image's Grams and, unless the scale starts from the content (whose first pass gives
  it), the content target; at each finer scale the first layers of one start candidate's pass (finer_start:
  the other's pass is the scale's first iteration, and this one stops once its loss so far is the higher;
  counted to the second style layer, about where it stopped in the benchmark: a choice that needs the whole
  pass takes up to a pass more, within the iteration reserved beside the fixed work); the float32 loss of the
  initial image, where its pass is not the first iteration's (coarse to fine, or a bf16 run: that pass then
  gives the float32 content target too, when the start is the content); after a bf16 run the float32 Grams
  of the styles and the float32 loss of the result; and encoding each answer.
With localized passes (localized.py) a pass over an image its tiles split is counted tile by tile, each with its
margin, and an iteration is each tile's forward pass without gradients (the first pass; the last tile's is held
for the second) and its forward and backward pass; the content target takes a tiled pass of its own, and the
finer start's other candidate is evaluated whole.
Both are counted pass by pass, each in multiply-accumulates of VGG19's convolutions (memory.py's walk over the
layer shapes: every other layer is cheap next to them), and turned into seconds by the device's speed,
measured once when the worker starts (`measure_speed`): for a forward pass without gradients and for an
iteration, in float32 and, where the device runs it natively, in bf16, the seconds of a pass whatever its size
(each operation's own overhead, which makes small images slow for their work) and per multiply-accumulate,
from the passes of a small image and one of CALIBRATION_SIZES[-1], from which up to 512 px a CPU takes about as
long per multiply-accumulate (at 1024 px about a fifth longer, its caches holding less of each activation:
docs/benchmarks.md, "Fixed work"). Only the Grams of styles the worker has not seen are counted: a cached style
(targets.GramCache) costs less.
"""

import math
import time
from dataclasses import dataclass, replace

import torch

from .layers import CONV_CHANNELS, LAYER_INDEX, LAYER_NAMES, deepest
from .losses import gram_matrix
from .localized import LocalizedPass, tiles
from .memory import Passes, _elements
from .optimize import scale_sizes
from .precision import extractor_precision, has_native_bf16, use_bf16
from .targets import StyleJob, output_size, style_size
from .vgg import VGGFeatures

CHECKPOINT_FACTOR = 1.5  # an iteration with VGG19's blocks run again in the backward pass (about a third more)
# The model is within 25 % of the measured work, and below it rather than above
# (docs/benchmarks.md, "Fixed work"): what may run once a deadline has passed is reserved that much over its
# estimate.
MARGIN = 1.25
# (height, width) of the calibration images: the smallest VGG19 takes to relu5_1, and one from which up a CPU's
# seconds per multiply-accumulate are about those of every larger size (at 96 px they were 15 % more)
CALIBRATION_SIZES = ((24, 32), (96, 128))
CALIBRATION_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
ENCODE_SIZE = 256  # px, square: the image whose PNG encoding is timed
# The timings of a measurement take turns, and the fastest of each counts: other work on the host (TorchServe's
# frontend starting beside the worker) only slows a timing. They go on for at least MEASURE_SECONDS, and until
# SETTLED rounds in a row have made no timing 5 % faster (IMPROVEMENT), so that once a burst of other work
# ends, some rounds run without it; at most MAX_SECONDS or MAX_ROUNDS.
MEASURE_SECONDS = 1.0
SETTLED = 3
IMPROVEMENT = 0.05
MAX_SECONDS = 6.0
MAX_ROUNDS = 50  # on a fast device a second holds many rounds: enough


@dataclass(frozen=True)
class PassTime:
    """Seconds of a pass through VGG19: `fixed` whatever its size, plus `per_mac` per multiply-accumulate."""

    fixed: float
    per_mac: float

    def __call__(self, macs: int) -> float:
        return self.fixed + self.per_mac * macs

    @classmethod
    def through(cls, small: tuple[int, float], large: tuple[int, float]) -> "PassTime":
        """The line through two timed passes (multiply-accumulates, seconds), neither part below 0."""
        (small_macs, small_seconds), (large_macs, large_seconds) = small, large
        per_mac = max(0.0, (large_seconds - small_seconds) / (large_macs - small_macs))
        return cls(max(0.0, large_seconds - per_mac * large_macs), per_mac)


@dataclass(frozen=True)
class DeviceSpeed:
    """How long VGG19's passes take, keyed by bf16 (False: float32), and seconds per pixel of encoding an
    answer. A device without native bf16 has only float32 entries (it never runs bf16: precision.use_bf16)."""

    forward: dict[bool, PassTime]  # a forward pass without gradients
    iteration: dict[bool, PassTime]  # a forward and a backward pass
    encode: float

    def describe(self) -> dict:
        """For the model's description and the log: what was measured, in readable units."""
        def readable(times: dict[bool, PassTime]) -> dict:
            return {"bf16" if bf16 else "fp32": {"ms_per_pass": round(t.fixed * 1e3, 3),
                                                 "ns_per_mac": round(t.per_mac * 1e9, 5)} for bf16, t in times.items()}

        return {"forward": readable(self.forward), "iteration": readable(self.iteration),
                "encode_ns_per_pixel": round(self.encode * 1e9, 2)}


def measure_speed(extractor: VGGFeatures, device: torch.device, seconds: float = MEASURE_SECONDS,
                  clock=time.perf_counter) -> DeviceSpeed:
    """Time a forward pass and an iteration of VGG19 on `device` (where the worker runs) at each of
    CALIBRATION_SIZES in each precision the device can run, and the PNG encoding of an image, taking turns for
    at least `seconds`; the fastest of each counts. `clock` times them (a worker's: the wall clock)."""
    from .codec import encode_image  # Pillow: imported only where timed

    image = torch.rand(3, ENCODE_SIZE, ENCODE_SIZE, generator=torch.Generator().manual_seed(0))
    work = {"encode": lambda: encode_image(image, "png")}
    precisions = (False, True) if has_native_bf16(device) else (False,)
    for bf16 in precisions:
        for grad in (False, True):
            for size in CALIBRATION_SIZES:
                work[bf16, grad, size] = lambda bf16=bf16, grad=grad, size=size: _pass(extractor, device, bf16,
                                                                                       grad, size)
    fastest = _fastest(work, seconds, clock)
    macs = {size: forward_macs(size, deepest(CALIBRATION_LAYERS)) for size in CALIBRATION_SIZES}

    def fitted(bf16: bool, grad: bool) -> PassTime:
        return PassTime.through(*((macs[size], fastest[bf16, grad, size]) for size in CALIBRATION_SIZES))

    return DeviceSpeed({bf16: fitted(bf16, grad=False) for bf16 in precisions},
                       {bf16: fitted(bf16, grad=True) for bf16 in precisions}, fastest["encode"] / ENCODE_SIZE**2)


def _pass(extractor: VGGFeatures, device: torch.device, bf16: bool, grad: bool, size: tuple[int, int]) -> None:
    """A forward pass of an image of `size` through the calibration layers and a loss on their Grams (as the
    objective takes them), and with `grad` the backward pass."""
    x = torch.rand(1, 3, *size, device=device, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        with extractor_precision(device, bf16):
            features = extractor(x, CALIBRATION_LAYERS, "max")
        loss = sum(gram_matrix(feature).square().mean() for feature in features.values())
        if grad:
            loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(work: dict, seconds: float, clock) -> dict:
    """The fastest time of each piece of `work` by `clock`, after a warm-up (the first call allocates and, on a
    GPU, picks algorithms), the pieces taking turns in rounds for at least `seconds` of the wall clock, until
    SETTLED rounds have made none faster (see MEASURE_SECONDS)."""
    for run in work.values():
        run()
    fastest = dict.fromkeys(work, math.inf)
    started, rounds, settled = time.perf_counter(), 0, 0
    while rounds < MAX_ROUNDS and time.perf_counter() - started < MAX_SECONDS:
        improved = False
        for key, run in work.items():
            start = clock()
            run()
            seconds_now = clock() - start
            improved |= seconds_now < (1 - IMPROVEMENT) * fastest[key]
            fastest[key] = min(fastest[key], seconds_now)
        rounds, settled = rounds + 1, 0 if improved else settled + 1
        if settled >= SETTLED and time.perf_counter() - started >= seconds:
            break
    return fastest


def forward_macs(size: tuple[int, int], deepest_layer: str) -> int:
    """Multiply-accumulates of one image of `size` through VGG19's convolutions up to `deepest_layer`."""
    last = LAYER_INDEX[deepest_layer]
    return sum(_elements(LAYER_NAMES[index], size) * in_channels * 9
               for index, (in_channels, _) in CONV_CHANNELS.items() if index <= last)


@dataclass(frozen=True)
class GroupCost:
    """What optimising a group of requests together costs, in seconds on the measured device."""

    fixed: float  # the work no deadline interrupts (the module's docstring), before and after the iterations
    after: float  # the part of it that runs after the iterations: the float32 loss after bf16, encoding
    iteration: float  # one iteration at the output size: how far past its deadline the last one can run
    iterations: float  # all the iterations the requests ask for, if none stops early

    @property
    def past_deadline(self) -> float:
        """What may still run once the group's deadline has passed, with MARGIN: an iteration that started just
        before it, and the work after the iterations."""
        return MARGIN * (self.iteration + self.after)

    @property
    def reserved(self) -> float:
        """What the group takes however short its time: its fixed work, and an iteration past its deadline."""
        return self.fixed - self.after + self.past_deadline

    def __add__(self, other: "GroupCost") -> "GroupCost":
        return GroupCost(*(a + b for a, b in zip((self.fixed, self.after, self.iteration, self.iterations),
                                                 (other.fixed, other.after, other.iteration, other.iterations))))


def group_cost(jobs: list[StyleJob], device: torch.device, speed: DeviceSpeed, passes: Passes = Passes()) -> GroupCost:
    """The cost of optimising `jobs` (which could share a batch) together on `device`, its passes run as `passes`
    says: a localized pass over an image its tiles split runs each tile with its margin, twice (localized.py)."""
    params, output = jobs[0].params, output_size(jobs[0])
    bf16 = use_bf16(params.precision, device, output[0] * output[1])
    batch, sizes = len(jobs), scale_sizes(jobs, output)
    all_layers = deepest((params.content_layer, *dict(params.style_layers)))
    style_layers = deepest(dict(params.style_layers))
    weighted = sorted((layer for layer, weight in params.style_layers if weight), key=LAYER_INDEX.__getitem__)
    streamed = weighted[1] if len(weighted) > 1 else all_layers  # where a finer start's other candidate stops
    from_content = all(job.params.init == "content" for job in jobs)  # then the first pass gives the target

    def runs(size: tuple[int, int]) -> list[tuple[int, int]]:
        """What a pass over an image of `size` runs VGG19 on: the image, or each tile with its margin."""
        layers = [params.content_layer, *dict(params.style_layers)]
        if not LocalizedPass.splits(size, passes.tile, layers):
            return [size]
        return [(part.run[1] - part.run[0], part.run[3] - part.run[2]) for part in tiles(size, passes.tile, layers)]

    def forward(size: tuple[int, int], layer: str, in_bf16: bool) -> float:
        return sum(speed.forward[in_bf16](batch * forward_macs(run, layer)) for run in runs(size))

    def styles(size: tuple[int, int], in_bf16: bool) -> float:
        """Every style image's Grams at scale `size`: a pass each."""
        return sum(speed.forward[in_bf16](forward_macs(style_size(style, size, job.params.style_scale), style_layers))
                   for job in jobs for style in job.styles)

    # the initial image's float32 loss has a pass of its own unless it is a float32 run's first iteration's
    initial_pass = bf16 or sizes[0] != output
    fixed = 0.0
    for index, size in enumerate(sizes):
        fixed += styles(size, bf16)
        # localized passes take the content target in a tiled pass of its own, and evaluate the finer start's
        # other candidate whole
        localized = runs(size) != [size]
        content_from_a_pass = from_content and not localized and (
            index == 0 or (size == output and initial_pass and not bf16))
        fixed += 0.0 if content_from_a_pass else forward(size, params.content_layer, bf16)
        fixed += forward(size, all_layers if localized else streamed, bf16) if index > 0 else 0.0
    if initial_pass:
        fixed += forward(output, all_layers, False)
    if bf16:  # the float32 objective the reported losses are taken with, its content target from the initial pass
        fixed += styles(output, False) + (0.0 if from_content else forward(output, params.content_layer, False))
    after = (forward(output, all_layers, False) if bf16 else 0.0) + speed.encode * batch * output[0] * output[1]

    def iteration(size: tuple[int, int]) -> float:
        factor, parts = CHECKPOINT_FACTOR if passes.checkpoint else 1, runs(size)
        backward = sum(speed.iteration[bf16](batch * forward_macs(run, all_layers)) * factor for run in parts)
        # localized, the first pass over every tile but the last, whose pass with gradients serves both
        return backward + sum(speed.forward[bf16](batch * forward_macs(run, all_layers)) for run in parts[:-1])

    per_scale = params.steps / len(sizes)  # the schedule's even split (optimize.py)
    return GroupCost(fixed=fixed + after, after=after, iteration=iteration(output),
                     iterations=sum(per_scale * iteration(size) for size in sizes))


def largest_size_within(job: StyleJob, device: torch.device, speed: DeviceSpeed, seconds: float,
                        smallest: int) -> int | None:
    """The largest `size` at which `job` alone reserves (GroupCost.reserved) at most `seconds` (None: not even
    at `smallest`)."""
    def fits(size: int) -> bool:
        resized = replace(job, params=replace(job.params, size=size))
        return group_cost([resized], device, speed).reserved <= seconds

    if not fits(smallest):
        return None
    fits_at, too_large = smallest, job.params.size
    while too_large - fits_at > 1:
        middle = (fits_at + too_large) // 2
        fits_at, too_large = (middle, too_large) if fits(middle) else (fits_at, middle)
    return fits_at
