"""How much memory a batch of requests needs at its peak, from the layer shapes, before it runs.

The handler refuses what cannot fit (413) and forms batches by it; benchmarks and tests check it against
measured peaks. Every term below is counted from the shapes of VGG19's activations at the output size, so it
holds for any size, batch and layer choice; where a term depends on the device's libraries, the comment says
which and why.

The peak of a request is the largest of its phases, on top of the objectives that live through the request (one
per scale, each with its content and Gram targets, and in bf16 the float32 one for the reported losses):
- optimising at the output size (the largest scale; coarser scales need a quarter as much and less):
  the state that lives through the scale (the images, the optimiser's history), plus one iteration's forward
  and backward pass, whose peak is where the backward pass begins: every activation the backward pass needs is
  still kept, and the loss has just produced a gradient for each loss layer; or, coarse to fine, where the
  scale starts: the first iteration's forward pass is held while the other start candidate's pass runs beside
  it without gradients (optimize.finer_start);
- computing the style targets: each style image through VGG19 at its size, without gradients, in the
  activations' precision and, in bf16, in float32 too: the float32 objective at the output size (whose
  losses are the ones reported) takes its style targets in float32, at the same sizes.
What it counts is the allocator's view: tensors alive at once. A CPU process's resident set runs up to a fifth
higher, since glibc keeps freed memory to reuse it (docs/limits.md, "Memory and admission").

With masks, each style adds its masks (at the output size and, squared, at each style layer's resolution) and
its own targets, and the guided Grams' float32 tiles of weighted activations (losses.py).

On the CPU, oneDNN's backward pass of a convolution (channels_last) works on a reordered copy of its weights:
one at a time, so the largest convolution's weights once more (2026-12-03: 8.4 MB measured for conv4's 9.4 MB,
none without gradients).

With `checkpoint`, each block of VGG19 keeps only its input during the forward pass and runs again in the
backward pass (vgg.py): the forward pass then keeps the block inputs and the loss layers' activations, and the
peak moves to the backward pass of the first block, which holds that block's activations again.

With localized passes (`tile`: localized.py), an iteration's pass is that of its largest tile with the margin,
plus the tile's pixels and their gradient and the total variation's image-sized differences; the style targets'
pass likewise, by tiles of the style image. What stays of the image's size is its state (the images, the
optimiser's history) and the objectives (content targets, masks): that is what limits the size then.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import NotEnoughMemory
from .layers import CONV_CHANNELS, LAYER_INDEX, LAYER_NAMES, deepest, poolings_before
from .lbfgs import HISTORY
from .localized import LocalizedPass, alignment, tiles
from .losses import GRAM_TILE_BYTES
from .optimize import scale_sizes
from .params import PARAM_FIELDS
from .precision import use_bf16
from .targets import StyleJob, output_size, style_size

FLOAT32 = 4
INDEX = 8  # max pooling keeps the position of each maximum as an int64 for its backward pass
# Images of the size of the output that live through a scale, per image: the image being optimised and its
# gradient, the best image so far, the scale's start, the initial image at the output size, and a copy of the
# images held still in a batch.
IMAGE_COPIES = 6
# L-BFGS keeps `HISTORY` pairs (s, y) and the previous image and gradient; a step adds the direction, the
# recursion's running vector and one gathered pair (s, y). Adam keeps two moments.
OPTIMIZER_IMAGES = {"lbfgs": 2 * HISTORY + 2 + 4, "adam": 2}
# A localized pass differentiates the total variation on the whole image: its two differences (a pixel fewer each
# way), their squares, and the gradients back through them, at most about this many images alive at once.
TV_IMAGES = 4


@dataclass(frozen=True)
class Workload:
    """What a batch asks of the memory: everything the estimate depends on."""

    output: tuple[int, int]  # (height, width) of the output
    style_sizes: tuple[tuple[int, int], ...]  # (height, width) of each style image of each job at the output size
    batch: int  # images optimised together
    content_layer: str
    style_layers: tuple[str, ...]
    pooling: str  # "max" or "avg"
    optimizer: str  # "lbfgs" or "adam"
    bf16: bool  # activations in bfloat16
    checkpoint: bool  # blocks run again in the backward pass
    device_type: str  # "cpu" or "cuda"
    guided_styles: int = 0  # with masks, the styles of each job (each with its mask and guided Gram), else 0
    coarser: tuple[tuple[int, int], ...] = ()  # (height, width) of the scales before the output's
    tile: int | None = None  # localized passes by tiles owning at most this many px a side; None: full passes


@dataclass(frozen=True)
class Passes:
    """How a batch's passes run: VGG19's blocks run again in the backward pass (`checkpoint`), and by tiles of at
    most `tile` px a side (localized.py) or, None, over the whole image."""

    checkpoint: bool = False
    tile: int | None = None


def workload(jobs: list[StyleJob], device: torch.device, passes: Passes = Passes()) -> Workload:
    """The Workload of optimising `jobs` (which could share a batch) together on `device`."""
    params, output = jobs[0].params, output_size(jobs[0])
    return Workload(
        output=output, batch=len(jobs),
        style_sizes=tuple(style_size(style, output, job.params.style_scale) for job in jobs for style in job.styles),
        content_layer=params.content_layer, style_layers=tuple(dict(params.style_layers)),
        pooling=params.pooling, optimizer=params.optimizer,
        bf16=use_bf16(params.precision, device, output[0] * output[1]), checkpoint=passes.checkpoint,
        device_type=device.type, guided_styles=len(jobs[0].styles) if jobs[0].masks else 0,
        coarser=tuple(scale_sizes(jobs, output)[:-1]), tile=passes.tile)


def fitting_mode(jobs: list[StyleJob], device: torch.device, budget: int, save_memory: bool = True) -> Passes | None:
    """How `jobs` fit in `budget` bytes optimised together, None where they do not. As the jobs' `passes` asks:
    full passes as they are, then (where save_memory allows) with checkpointing, then (auto only) localized;
    localized passes with the jobs' `tile`, or else the largest tile that fits, since fewer tiles cost less."""
    params = jobs[0].params
    modes = [] if params.passes == "localized" else [Passes()] + ([Passes(checkpoint=True)] if save_memory else [])
    for passes in modes:
        if peak_bytes(workload(jobs, device, passes)) <= budget:
            return passes
    if params.passes == "full" or (params.passes == "auto" and not save_memory):
        return None
    if params.tile is not None:
        passes = Passes(tile=params.tile)
        return passes if peak_bytes(workload(jobs, device, passes)) <= budget else None
    return _largest_tile(jobs, device, budget)


def _largest_tile(jobs: list[StyleJob], device: torch.device, budget: int) -> Passes | None:
    """Localized passes by the largest tile, a multiple of the alignment, with which `jobs` fit in `budget`."""
    params = jobs[0].params
    step = alignment([params.content_layer, *dict(params.style_layers)])
    fits, too_large = 0, max(output_size(jobs[0])) // step + 1  # in steps: 0 stands for none
    while too_large - fits > 1:
        middle = (fits + too_large) // 2
        if peak_bytes(workload(jobs, device, Passes(tile=middle * step))) <= budget:
            fits = middle
        else:
            too_large = middle
    smallest = PARAM_FIELDS["tile"].metadata["check"].lo
    return Passes(tile=fits * step) if fits * step >= smallest else None


def admit(job: StyleJob, device: torch.device, budget: int, save_memory: bool = True) -> Passes:
    """How `job` alone runs within `budget` bytes (fitting_mode). Where it does not fit at all, raises
    NotEnoughMemory before any work, naming what does not fit and the largest value of it that does: its
    style_scale where a smaller one fits at this size (its style images' targets are the peak), else its size."""
    passes = fitting_mode([job], device, budget, save_memory)
    if passes is not None:
        return passes
    needed = peak_bytes(workload([job], device, _leanest(job.params, save_memory)))
    field, largest = "style_scale", _largest_that_fits(job, "style_scale", True, device, budget, save_memory)
    if largest is None:
        field, largest = "size", _largest_that_fits(job, "size", False, device, budget, save_memory)
    value = getattr(job.params, field)
    fits = f"{field} at most {largest:g} fits" if largest is not None else "no size fits"
    where = f" at size {job.params.size}" if field == "style_scale" else ""
    raise NotEnoughMemory(field, f"{field} {value:g} with these images and settings needs about "
                                 f"{needed / 2**30:.2f} GiB at its peak; this worker has {budget / 2**30:.2f} GiB "
                                 f"for a request: {fits}{where}")


def _leanest(params, save_memory: bool) -> Passes:
    """The passes of the least memory that fitting_mode may choose for these parameters."""
    if params.passes == "localized" or (params.passes == "auto" and save_memory):
        return Passes(tile=params.tile or PARAM_FIELDS["tile"].metadata["check"].lo)
    return Passes(checkpoint=save_memory)


def _largest_that_fits(job: StyleJob, field: str, hundredths: bool, device: torch.device, budget: int,
                       save_memory: bool) -> float | None:
    """The largest value of the parameter `field` below the job's, in whole units or hundredths, down to the
    parameter's smallest, with which the job fits in `budget`; None where none does. Its peak grows with it."""
    unit = 100 if hundredths else 1
    smallest = math.ceil(PARAM_FIELDS[field].metadata["check"].lo * unit)
    fits, too_large = smallest - 1, round(getattr(job.params, field) * unit)  # known to fit, known not to
    while too_large - fits > 1:
        middle = (fits + too_large) // 2
        trial = replace(job, params=replace(job.params, **{field: middle / unit if hundredths else middle}))
        if fitting_mode([trial], device, budget, save_memory) is None:
            too_large = middle
        else:
            fits = middle
    return None if fits < smallest else (fits / unit if hundredths else fits)


def peak_bytes(work: Workload) -> int:
    """The bytes a batch adds to the device at its peak, beyond the extractor's weights."""
    # checkpointed, the backward pass keeps no bf16 weights: checkpointing drops them with the activations
    kept_weights = 0 if work.checkpoint else _library_bytes(work)
    optimisation = _optimisation_bytes(work) + kept_weights + _backward_weights_bytes(work)
    style_runs = [_largest_run(work, size, work.style_layers) for size in work.style_sizes]  # by tiles, localized
    targets = max((_targets_bytes(work, run) for run in style_runs), default=0) + _library_bytes(work)
    float32_targets = max((_targets_bytes(work, run, FLOAT32) for run in style_runs if work.bf16), default=0)
    return _objectives_bytes(work) + max(optimisation, targets, float32_targets)


def _objectives_bytes(work: Workload) -> int:
    """The objectives built so far, which live until the request ends (optimize._Run keeps them): one per scale
    and, in bf16, the float32 one at the output size. Per image, each holds its content target, its Gram targets
    (with masks, one per style) and, with masks, their squares at each style layer's resolution."""
    sizes = [*work.coarser, work.output, *([work.output] if work.bf16 else [])]
    grams = max(1, work.guided_styles) * sum(_channels(name) ** 2 for name in work.style_layers)
    return work.batch * FLOAT32 * sum(
        _elements(work.content_layer, size) + grams
        + work.guided_styles * sum(_elements(name, size) // _channels(name) for name in work.style_layers)
        for size in sizes)


def _optimisation_bytes(work: Workload) -> int:
    height, width = work.output
    pixels = height * width
    state = (IMAGE_COPIES + OPTIMIZER_IMAGES[work.optimizer]) * 3 * pixels * FLOAT32
    return work.batch * (state + _step(work) + _guidance_bytes(work))


def _step(work: Workload) -> int:
    """Per image, one iteration's pass at its peak: over the whole image, or localized, over the largest tile."""
    run = _largest_run(work, work.output, [work.content_layer, *work.style_layers])
    if run != work.output:
        return _step(replace(work, output=run, coarser=(), tile=None)) + _localized_extra(work, run)
    return _checkpointed_step(work) if work.checkpoint else _plain_step(work)


def _largest_run(work: Workload, size: tuple[int, int], layers) -> tuple[int, int]:
    """What the largest pass over an image of `size` runs on: the image, or localized its largest tile with
    the margin."""
    if not LocalizedPass.splits(size, work.tile, layers):
        return size
    top, bottom, left, right = max((_pixels((p.run[1] - p.run[0], p.run[3] - p.run[2])), p.run)
                                   for p in tiles(size, work.tile, layers))[1]
    return bottom - top, right - left


def _localized_extra(work: Workload, run: tuple[int, int]) -> int:
    """Per image, what a localized pass holds beside a tile's pass: the tile's pixels and their gradient, and
    the total variation's differences of the whole image and their gradients (it is differentiated whole)."""
    return (2 * _pixels(run) + TV_IMAGES * _pixels(work.output)) * 3 * FLOAT32


def _guidance_bytes(work: Workload) -> int:
    """With masks, per image and style: its mask at the output size, and the guided Gram's float32 tiles of
    weighted activations, the backward pass's two at a time."""
    return work.guided_styles * (_pixels(work.output) * FLOAT32 + 2 * GRAM_TILE_BYTES)


def _backward_weights_bytes(work: Workload) -> int:
    """On the CPU, the reordered copy of the largest convolution's weights that its backward pass works on."""
    if work.device_type != "cpu":
        return 0
    return FLOAT32 * max(in_channels * out_channels * 9 for index, (in_channels, out_channels)
                         in CONV_CHANNELS.items() if index <= LAYER_INDEX[_deepest(work)])


def _plain_step(work: Workload) -> int:
    """Per image: where the backward pass begins, every activation kept for it, plus each loss layer's
    gradient (or, at a finer scale's start, the other candidate's pass beside the held one: _streamed_pass),
    plus the content term's float32 difference (kept by its square)."""
    return _kept_activations(work, _modules(work)) + _beside_the_kept(work) + _content_difference(work)


def _beside_the_kept(work: Workload) -> int:
    """What a held forward pass has beside it at its peak: the loss layers' gradients where its backward pass
    begins, or, where a finer scale starts (coarse to fine), the other candidate's pass without gradients
    (optimize.finer_start), whichever is larger."""
    return max(_loss_gradients(work), _streamed_pass(work) if work.coarser else 0)


def _streamed_pass(work: Workload) -> int:
    """Per image, a pass without gradients that keeps no activation (VGGFeatures.stream): its normalised input
    (float32) and, at each layer, that layer's input and output, the widest two."""
    activation = 2 if work.bf16 else FLOAT32
    widest = max(_elements(name, work.output) for name in _modules(work))
    return 3 * _pixels(work.output) * FLOAT32 + 2 * widest * activation


def _checkpointed_step(work: Workload) -> int:
    """Per image, the larger of: where the backward pass begins (the block inputs, the loss layers'
    activations and their gradients, or what a finer scale's start has beside them: _beside_the_kept), and the
    backward pass through the first block's last ReLU, which holds
    the block's input, its ReLUs' outputs again, the gradient the loss gave its loss layers, and the gradient
    going into and out of that ReLU (the positions of the pooling's maxima are gone by then)."""
    activation = 2 if work.bf16 else FLOAT32
    loss_layers = _loss_layers(work)
    block_inputs = 3 * _pixels(work.output) * activation + sum(
        _elements(name, work.output) * activation for name in _modules(work)
        if name.startswith("pool") and LAYER_INDEX[name] < LAYER_INDEX[_deepest(work)])
    kept_for_loss = sum(_elements(name, work.output) * activation for name in loss_layers)
    start = block_inputs + kept_for_loss + _beside_the_kept(work) + _content_difference(work)
    first_block = [name for name in _modules(work) if poolings_before(name) == 0]
    relus = sum(_elements(name, work.output) * activation for name in first_block if name.startswith("relu"))
    widest = max(_elements(name, work.output) for name in first_block) * activation
    pending = sum(_elements(name, work.output) * activation for name in loss_layers if name in first_block)
    first = 3 * _pixels(work.output) * activation + relus + pending + 2 * widest
    return max(start, first)


def _kept_activations(work: Workload, modules: list[str]) -> int:
    """What the forward pass through `modules` keeps for the backward pass: the input (as the first
    convolution sees it), each ReLU's output (which the next convolution and pooling also use), each
    pooling's output and, for max pooling, the positions of its maxima; and any requested convolution output,
    which the loss keeps."""
    activation = 2 if work.bf16 else FLOAT32
    kept = 3 * _pixels(work.output) * activation if modules and modules[0] == LAYER_NAMES[0] else 0
    for name in modules:
        elements = _elements(name, work.output)
        if name.startswith("relu") or (name.startswith("conv") and name in _loss_layers(work)):
            kept += elements * activation
        elif name.startswith("pool"):
            kept += elements * (activation + (INDEX if work.pooling == "max" else 0))
    return kept


def _loss_gradients(work: Workload) -> int:
    """The gradient the loss gives each loss layer, in the activations' dtype."""
    activation = 2 if work.bf16 else FLOAT32
    return sum(_elements(name, work.output) * activation for name in _loss_layers(work))


def _content_difference(work: Workload) -> int:
    return _elements(work.content_layer, work.output) * FLOAT32


def _targets_bytes(work: Workload, size: tuple[int, int], activation: int | None = None) -> int:
    """One style image of `size` through VGG19 without gradients, its activations `activation` bytes each (by
    default the run's): the image and its normalised copy (float32) live through the pass; at each layer its
    input and output are live, with the style layers' activations before it, kept for their Grams. The peak
    is usually at relu1_2: relu1_1 kept, conv1_2's output and relu1_2's, three full-size activations."""
    activation = activation or (2 if work.bf16 else FLOAT32)
    style_layers = set(work.style_layers)
    peak, kept, previous = 0, 0, 0  # the first convolution's input is the normalised image, counted apart
    for name in LAYER_NAMES[: LAYER_INDEX[deepest(work.style_layers)] + 1]:
        output = _elements(name, size) * activation
        peak = max(peak, kept + previous + output)
        kept, previous = (kept + output, 0) if name in style_layers else (kept, output)
    return peak + 2 * 3 * _pixels(size) * FLOAT32


def _library_bytes(work: Workload) -> int:
    """What is paid once per batch: bf16 autocast keeps a bf16 copy of the convolution weights while the
    forward pass runs, and the autograd graph keeps them for the backward pass. cuDNN's workspace is bounded
    by PyTorch's choice of algorithms, not counted here: the handler's margin covers it, as it covers what the
    CPU allocator keeps of freed memory to reuse."""
    if not work.bf16:
        return 0
    return 2 * sum(in_channels * out_channels * 9 + out_channels
                   for index, (in_channels, out_channels) in CONV_CHANNELS.items()
                   if index <= LAYER_INDEX[_deepest(work)])


def _modules(work: Workload) -> list[str]:
    return list(LAYER_NAMES[: LAYER_INDEX[_deepest(work)] + 1])


def _deepest(work: Workload) -> str:
    return deepest([work.content_layer, *work.style_layers])


def _loss_layers(work: Workload) -> set[str]:
    return {work.content_layer, *work.style_layers}


def _elements(name: str, size: tuple[int, int]) -> int:
    """Elements of one image's activation at layer `name` for an image of `size`."""
    halvings = poolings_before(name)
    channels = 3 if name == "input" else _channels(name)
    return channels * (size[0] >> halvings) * (size[1] >> halvings)


def _channels(name: str) -> int:
    """Output channels of a layer: those of the last convolution at or before it."""
    index = LAYER_INDEX[name]
    return CONV_CHANNELS[max(i for i in CONV_CHANNELS if i <= index)][1]


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now: on a GPU what CUDA reports; on a CPU the kernel's MemAvailable, or less
    where a cgroup (a container's memory limit) leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_bytes("MemAvailable")
    return min(available, _cgroup_room() or available)


def _meminfo_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


# cgroup v2, then v1: (limit, usage)
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_room() -> int | None:
    """What this process's memory cgroup still allows, or None where it sets no limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2**62:  # v1 writes a huge number for "no limit", v2 "max"
            return max(0, int(limit) - int(usage))
        return None
    return None
