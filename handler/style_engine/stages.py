"""The stages of a request's work, each marked for torch.profiler, so that a profile (benchmarks/fixed_work.py,
or any torch.profiler run) shows where a request's time goes. Outside a profiler a mark costs microseconds.

Every stage but ITERATION is fixed work: it runs whatever the time budget (cost.py models it).
"""

import torch
from torch.profiler import record_function

PREPARE = "style_engine.prepare"  # the images reduced to what the optimisation uses, hashed, moved to the device
CONTENT_TARGET = "style_engine.content_target"  # a pass of its own for a scale's content target
STYLE_TARGETS = "style_engine.style_targets"  # one style image's Grams at one scale (none from the cache)
INITIAL_LOSS = "style_engine.initial_loss"  # the reported float32 loss of the initial image
FINER_START = "style_engine.finer_start"  # where a finer scale starts: the candidate evaluated without gradient
START_LOSS = "style_engine.start_loss"  # the loss of a scale's start where no iteration ran there
FINAL_LOSS = "style_engine.final_loss"  # the reported float32 loss of the result, after a bf16 run
ITERATION = "style_engine.iteration"  # one optimiser iteration: forward and backward pass, step

FIXED = (PREPARE, CONTENT_TARGET, STYLE_TARGETS, INITIAL_LOSS, FINER_START, START_LOSS, FINAL_LOSS)


def mark(stage: str, images: torch.Tensor | None = None):
    """The profiler's mark of `stage`, named "<stage> <width>x<height>" when it works on `images` (..., H, W)."""
    return record_function(stage if images is None else f"{stage} {images.shape[-1]}x{images.shape[-2]}")
