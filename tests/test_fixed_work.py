"""Fixed work: what a request waits for beside its iterations (docs/benchmarks.md, "Fixed work"). Its passes
through VGG19, counted, the same on any CPU: a change that adds one fails here, whatever the CPU's speed; and
its time measured as benchmarks/fixed_work.py measures it, in iterations at the output size, at a small size
(the benchmark has 512 and 1024 px)."""

import statistics
from dataclasses import dataclass, replace

import pytest
import torch

import fixed_work
from conftest import needs_bf16
from style_engine import StyleJob, parse_params, stylize_batch
from style_engine.layers import LAYER_INDEX
from style_engine.targets import GramCache

OUTPUT, COARSE = (48, 64), (24, 32)  # the 96 px sample (4:3) at size 64, and its coarse scale
STYLE_AT_OUTPUT, STYLE_AT_COARSE = (40, 64), (20, 32)  # starry_night (1.6:1) at each


@dataclass(frozen=True)
class Pass:
    """One pass through the extractor: the size of its images, whether gradients flow, whether it runs in
    bf16, and the deepest layer it reached."""

    size: tuple[int, int]
    grad: bool = False
    bf16: bool = False
    deepest: str = "relu5_1"


def passes_of(extractor, monkeypatch, job: StyleJob) -> list[Pass]:
    """The passes a request makes through `extractor`, in order; a streamed pass (VGGFeatures.stream) as far as
    it was taken."""
    seen: list[Pass] = []

    def now(images, deepest) -> Pass:
        return Pass(tuple(images.shape[-2:]), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), deepest)

    def forward_hook(module, args, kwargs):
        seen.append(now(args[0], max(args[1], key=LAYER_INDEX.__getitem__)))

    stream = extractor.stream

    def counted_stream(images, layers, *args):
        index = len(seen)
        seen.append(now(images, None))
        for layer, activation in stream(images, layers, *args):
            seen[index] = replace(seen[index], deepest=layer)
            yield layer, activation

    hook = extractor.register_forward_pre_hook(forward_hook, with_kwargs=True)
    monkeypatch.setattr(extractor, "stream", counted_stream)
    try:
        (result,) = stylize_batch(extractor, [job], gram_cache=GramCache())
    finally:
        hook.remove()
    assert result.steps == job.params.steps
    return seen


def job_of(content, style, **params) -> StyleJob:
    return StyleJob(content, (style,), parse_params({"size": 64, "early_stop_tol": 0, **params})[0])


def test_one_scale_in_float32_passes_only_its_style_beside_the_iterations(extractor, content, style, monkeypatch):
    """The content target and the initial loss come from the first iteration's pass, whose start is the content."""
    passes = passes_of(extractor, monkeypatch, job_of(content, style, min_scale=64, steps=3, precision="fp32"))
    assert passes == [Pass(STYLE_AT_OUTPUT)] + [Pass(OUTPUT, grad=True)] * 3


def test_coarse_to_fine_in_float32_passes_the_initial_image_once_and_a_few_layers_of_a_start(
        extractor, content, style, monkeypatch):
    """At the output size: the style, the initial image (its loss, and the content target), then the finer
    start: the carried change's pass, held, is the first iteration's, and the upsampled result's stops once its
    loss so far is the higher. At the coarse scale, the style; its content target comes from its first
    iteration's pass."""
    passes = passes_of(extractor, monkeypatch, job_of(content, style, min_scale=32, steps=4, precision="fp32"))
    upsampled = passes[6]
    assert upsampled.deepest in ("relu1_1", "relu2_1")  # the first style layers (here, the first)
    assert passes == [Pass(STYLE_AT_OUTPUT), Pass(OUTPUT), Pass(STYLE_AT_COARSE), Pass(COARSE, grad=True),
                      Pass(COARSE, grad=True), Pass(OUTPUT, grad=True), Pass(OUTPUT, deepest=upsampled.deepest),
                      Pass(OUTPUT, grad=True)]


@needs_bf16
def test_one_scale_in_bf16_passes_the_float32_objective_and_result_beside_the_iterations(
        extractor, content, style, monkeypatch):
    """The losses reported are float32's: the style, the initial image (its loss, and the float32 content
    target) and the result in float32; beside them the bf16 style targets; the bf16 content target comes from
    the first iteration's pass."""
    passes = passes_of(extractor, monkeypatch, job_of(content, style, min_scale=64, steps=3, precision="bf16"))
    assert passes == [Pass(STYLE_AT_OUTPUT), Pass(OUTPUT), Pass(STYLE_AT_OUTPUT, bf16=True)] + [
        Pass(OUTPUT, grad=True, bf16=True)] * 3 + [Pass(OUTPUT)]


@pytest.mark.parametrize("schedule", fixed_work.SCHEDULES)
def test_fixed_work_is_at_most_one_and_a_half_iterations_in_float32(extractor, schedule, cpu_time):
    """From the request's files to its encoded answer, 128 px (coarse to fine from 64 px), in CPU time (the
    median of three runs). In bf16 the float32 passes of the reported losses cost more than bf16 iterations
    (docs/benchmarks.md, "Fixed work"): there the passes above and the time model (tests/test_cost.py) hold it."""
    files = fixed_work.CONTENT.read_bytes(), fixed_work.STYLE.read_bytes()
    fixed_work.request(extractor, files, 128, schedule, "fp32", cpu_time)  # warm-up: first use of these sizes
    runs = [fixed_work.request(extractor, files, 128, schedule, "fp32", cpu_time) for _ in range(3)]
    assert statistics.median(run["fixed_iterations"] for run in runs) <= 1.5, runs
