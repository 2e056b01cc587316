"""How long a batch of requests takes, from the layer shapes and the device's measured speed, before it runs.

Beside memory.py's model of the bytes, this is the model of the seconds: the handler forms and schedules its
groups by it so that a whole call, every group's work included, ends before TorchServe gives up on the
worker, and refuses before any work a request that could not finish within the server's maximum even alone.

An optimisation's time is of two kinds:
- iterations (a forward and a backward pass through VGG19 per image): the deadline is checked before each,
  so they stop when time runs out, at most one iteration late;
- fixed work that no deadline interrupts: at each scale the content target and every style image's Gram
  targets (a forward pass each, without gradients), the evaluation of the start image where a scale runs no
  iteration, the float32 losses reported (of the initial image, and of the result after a bf16 run, with
  float32 targets at the output size), and encoding each answer.
Both are counted in multiply-accumulates of VGG19's convolutions (memory.py's walk over the layer shapes:
every other layer is cheap next to them) and turned into seconds by the device's speed, measured once when
the worker starts (`measure_speed`): seconds per multiply-accumulate, with and without gradients, in float32
and, where the device runs it natively, in bf16.

The speed is measured at a small size; per multiply-accumulate a device is slower at large sizes (on a CPU,
activations no longer fit its caches: up to about twice, at 512 px against 128 px, on this project's CPUs),
and other work on the host slows it. `SAFETY` covers that for the fixed work, where an underestimate would
overrun a deadline; for iterations the deadline is checked as they run, so the model only has to divide the
time between groups fairly.
"""

import time
from dataclasses import dataclass, replace

import torch

from .layers import CONV_CHANNELS, LAYER_INDEX, LAYER_NAMES, deepest
from .memory import _elements
from .optimize import scale_sizes
from .precision import extractor_precision, has_native_bf16, use_bf16
from .targets import StyleJob, output_size, style_size
from .vgg import VGGFeatures

SAFETY = 2.0  # on estimates of the fixed work: see above
CHECKPOINT_FACTOR = 1.5  # an iteration with VGG19's blocks run again in the backward pass (about a third more)
CALIBRATION_SIZE = 96  # px, square: small enough to time in a fraction of a second even on a slow CPU
CALIBRATION_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
ENCODE_SIZE = 256  # px, square: the image whose PNG encoding is timed
REPEATS = 3  # timings per measurement after a warm-up; the fastest counts (others' work only slows a run)
# A forward pass without gradients costs this much of an iteration, at most: without weight gradients the
# backward pass repeats about the forward's convolutions, and keeps more. Timed rather than assumed, one pass
# more would double the calibration's exposure to other work on the host.
FORWARD_SHARE = 0.5


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per multiply-accumulate of VGG19's convolutions, keyed by bf16 (False: float32), and seconds per
    pixel of encoding an answer. A device without native bf16 has only float32 entries (it never runs bf16:
    precision.use_bf16)."""

    forward: dict[bool, float]  # a forward pass without gradients
    iteration: dict[bool, float]  # a forward and a backward pass
    encode: float

    def describe(self) -> dict:
        """For the model's description and the log: what was measured, in readable units."""
        return {"forward_ns_per_mac": {_name(bf16): round(s * 1e9, 5) for bf16, s in self.forward.items()},
                "iteration_ns_per_mac": {_name(bf16): round(s * 1e9, 5) for bf16, s in self.iteration.items()},
                "encode_ns_per_pixel": round(self.encode * 1e9, 2)}


def _name(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def measure_speed(extractor: VGGFeatures, device: torch.device) -> DeviceSpeed:
    """Time an iteration of VGG19 on `device` (where the worker runs) at CALIBRATION_SIZE in each precision the
    device can run, and the PNG encoding of an image. A fraction of a second on a CPU."""
    from .codec import encode_image  # Pillow: imported only where timed

    macs = forward_macs((CALIBRATION_SIZE, CALIBRATION_SIZE), deepest(CALIBRATION_LAYERS))
    iteration = {bf16: _fastest(lambda: _iteration(extractor, device, bf16)) / macs
                 for bf16 in ((False, True) if has_native_bf16(device) else (False,))}
    forward = {bf16: seconds * FORWARD_SHARE for bf16, seconds in iteration.items()}
    image = torch.rand(3, ENCODE_SIZE, ENCODE_SIZE, generator=torch.Generator().manual_seed(0))
    encode = _fastest(lambda: encode_image(image, "png")) / ENCODE_SIZE**2
    return DeviceSpeed(forward, iteration, encode)


def _iteration(extractor: VGGFeatures, device: torch.device, bf16: bool) -> None:
    x = torch.rand(1, 3, CALIBRATION_SIZE, CALIBRATION_SIZE, device=device, requires_grad=True)
    with torch.enable_grad():
        with extractor_precision(device, bf16):
            features = extractor(x, CALIBRATION_LAYERS, "max")
        sum(feature.float().square().mean() for feature in features.values()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(work) -> float:
    work()  # warm-up: the first call allocates and, on a GPU, picks algorithms
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_macs(size: tuple[int, int], deepest_layer: str) -> int:
    """Multiply-accumulates of one image of `size` through VGG19's convolutions up to `deepest_layer`."""
    last = LAYER_INDEX[deepest_layer]
    return sum(_elements(LAYER_NAMES[index], size) * in_channels * 9
               for index, (in_channels, _) in CONV_CHANNELS.items() if index <= last)


@dataclass(frozen=True)
class GroupCost:
    """What optimising a group of requests together costs, in seconds on the measured device."""

    fixed: float  # the work no deadline interrupts, SAFETY included, one iteration's overrun too
    iterations: float  # all the iterations the requests ask for, if none stops early

    def __add__(self, other: "GroupCost") -> "GroupCost":
        return GroupCost(self.fixed + other.fixed, self.iterations + other.iterations)


def group_cost(jobs: list[StyleJob], device: torch.device, speed: DeviceSpeed, checkpoint: bool = False) -> GroupCost:
    """The cost of optimising `jobs` (which could share a batch) together on `device`."""
    params, output = jobs[0].params, output_size(jobs[0])
    bf16 = use_bf16(params.precision, device, output[0] * output[1])
    batch, sizes = len(jobs), scale_sizes(jobs, output)
    layers = (params.content_layer, *dict(params.style_layers))
    all_layers, style_layers = deepest(layers), deepest(dict(params.style_layers))
    forward = speed.forward[bf16]
    iteration = speed.iteration[bf16] * (CHECKPOINT_FACTOR if checkpoint else 1.0)

    def targets(size: tuple[int, int], rate: float) -> float:
        """The content target of every image and the Grams of every style image, at scale `size`."""
        styles = sum(forward_macs(style_size(style, size, job.params.style_scale), style_layers)
                     for job in jobs for style in job.styles)
        return rate * (batch * forward_macs(size, params.content_layer) + styles)

    fixed = sum(targets(size, forward) + forward * batch * forward_macs(size, all_layers) for size in sizes)
    fp32_forward = speed.forward[False]
    reported = 2 if bf16 else 1  # float32 losses: the initial image, and after bf16 the result
    fixed += fp32_forward * reported * batch * forward_macs(output, all_layers)
    if bf16:
        fixed += targets(output, fp32_forward)  # the float32 objective those losses are taken with
    fixed += iteration * batch * forward_macs(output, all_layers)  # the one that may start before the deadline
    fixed += speed.encode * batch * output[0] * output[1]
    per_scale = params.steps / len(sizes)  # the schedule's even split (optimize.py)
    iterations = sum(iteration * batch * per_scale * forward_macs(size, all_layers) for size in sizes)
    return GroupCost(SAFETY * fixed, iterations)


def largest_size_within(job: StyleJob, device: torch.device, speed: DeviceSpeed, seconds: float,
                        smallest: int) -> int | None:
    """The largest `size` at which `job` alone has fixed work within `seconds` (None: not even `smallest`)."""
    def fits(size: int) -> bool:
        resized = replace(job, params=replace(job.params, size=size))
        return group_cost([resized], device, speed).fixed <= seconds

    if not fits(smallest):
        return None
    fits_at, too_large = smallest, job.params.size
    while too_large - fits_at > 1:
        middle = (fits_at + too_large) // 2
        fits_at, too_large = (middle, too_large) if fits(middle) else (fits_at, middle)
    return fits_at

