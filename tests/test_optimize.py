"""The optimisation loop: what it converges to, when it stops, and that batching changes nothing."""

import os
import re
import time

import pytest
import torch

from conftest import PRECISIONS, needs_bf16
from style_engine import ImageError, ParamError, StyleJob, TooLargeError, parse_params, stylize, stylize_batch
from style_engine import precision, targets
from style_engine.codec import encode_image
from style_engine.color import keep_content_chroma, match_colors, rgb_to_yiq
from style_engine.optimize import scale_sizes
from style_engine.resize import resize
from style_engine.targets import GramCache, build_objective, check_job



def params(**overrides):
    return parse_params({"size": 64, "steps": 30, **overrides})[0]


def total_loss(extractor, job: StyleJob, image: torch.Tensor, size: tuple[int, int]) -> float:
    """The float32 total loss of `image` (3, h, w), resized to `size`, against `job` optimised at that size."""
    objective = build_objective(extractor, [job], size, size, bf16=False)
    images = resize(image, size)[None]
    return objective(extractor(images, objective.layers, job.params.pooling), images).total.item()


def test_style_equal_to_content_starting_from_content_has_zero_loss(extractor, content):
    result = stylize(extractor, content, [content], params(steps=3))
    assert result.initial_loss["total"] == 0.0 and result.final_loss["total"] == 0.0
    assert torch.equal(result.image, resize(content, (48, 64)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_style_loss_falls_by_90_percent_within_30_lbfgs_steps(extractor, content, style, precision):
    result = stylize(extractor, content, [style], params(steps=30, early_stop_tol=0, precision=precision))
    assert result.steps == 30 and result.stop_reason == "steps"
    assert result.final_loss["style"] <= 0.1 * result.initial_loss["style"]
    assert result.image.shape == (3, 48, 64) and 0 <= result.image.min() and result.image.max() <= 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_inputs_give_the_same_bytes(extractor, content, style, precision):
    p = params(steps=8, init="noise", seed=7, precision=precision)
    first, second = (encode_image(stylize(extractor, content, [style], p).image) for _ in range(2))
    assert first == second
    other_seed = encode_image(stylize(extractor, content, [style], params(steps=8, init="noise", seed=8)).image)
    assert other_seed != first


def test_inputs_are_not_modified(extractor, content, style):
    before = content.clone(), style.clone()
    stylize(extractor, content, [style], params(steps=3, preserve_color="histogram"))
    assert torch.equal(content, before[0]) and torch.equal(style, before[1])


def test_blend_weights_one_and_zero_equal_the_single_style(extractor, content, style, style2):
    single = stylize(extractor, content, [style], params(steps=5))
    blended = stylize(extractor, content, [style, style2], params(steps=5, style_blend=[1, 0]))
    assert torch.equal(single.image, blended.image)
    assert single.final_loss == blended.final_loss
    even = stylize(extractor, content, [style, style2], params(steps=5))
    assert not torch.equal(even.image, single.image)


def test_style_blend_must_match_the_style_images(extractor, content, style):
    with pytest.raises(ParamError, match="one weight per style image: 1 image") as error:
        stylize(extractor, content, [style], params(style_blend=[1, 1]))
    assert error.value.field == "style_blend"


def test_images_too_narrow_for_the_deepest_layer(extractor, content, style):
    with pytest.raises(ImageError, match="at least 16 px") as error:
        stylize(extractor, torch.rand(3, 4, 200), [style], params())
    assert error.value.field == "content"
    with pytest.raises(ImageError) as error:
        stylize(extractor, content, [style, torch.rand(3, 300, 5)], params())
    assert error.value.field == "style_2"
    # a shallower objective needs less: relu2_1 is reached after one pooling
    shallow = params(content_layer="relu2_1", style_layers={"relu1_1": 1, "relu2_1": 1}, size=32)
    assert stylize(extractor, torch.rand(3, 4, 40), [style], shallow).image.shape == (3, 3, 32)


def test_preserve_color_luminance_keeps_the_contents_chroma(extractor, content, style):
    result = stylize(extractor, content, [style], params(preserve_color=True))
    chroma, content_chroma = rgb_to_yiq(result.image)[1:], rgb_to_yiq(resize(content, (48, 64)))[1:]
    # Exact but for clamping to the RGB cube where the new luminance pushes a colour out of it.
    assert (chroma - content_chroma).abs().mean() < 0.01
    plain = stylize(extractor, content, [style], params())
    assert (rgb_to_yiq(plain.image)[1:] - content_chroma).abs().mean() > 0.02


def test_luminance_preservation_against_the_standards_luma():
    """Reference values, not the module's own conversion: YIQ's Y is BT.601 luma, 0.299 R + 0.587 G + 0.114 B,
    and a grey has no chroma (I = Q = 0). So with a grey content any result turns grey at its own luma, and a
    grey result at the content's luma gives the content back."""
    result = torch.tensor([[1.0, 0.0, 0.0, 0.2], [0.0, 1.0, 0.0, 0.9], [0.0, 0.0, 1.0, 0.4]]).reshape(3, 1, 4)
    luma = 0.299 * result[0] + 0.587 * result[1] + 0.114 * result[2]  # red 0.299, green 0.587, blue 0.114
    greyed = keep_content_chroma(result, torch.full((3, 1, 4), 0.5))
    torch.testing.assert_close(greyed, luma.expand(3, 1, 4), rtol=0, atol=1e-5)
    orange = torch.tensor([0.8, 0.4, 0.2]).reshape(3, 1, 1).expand(3, 2, 2)
    grey_at_its_luma = torch.full((3, 2, 2), 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2)
    torch.testing.assert_close(keep_content_chroma(grey_at_its_luma, orange), orange, rtol=0, atol=1e-5)


def test_histogram_matching_gives_the_style_the_contents_colour_statistics(content, style):
    recoloured = match_colors(style, content)
    pixels, target = recoloured.flatten(1), content.flatten(1)
    assert torch.allclose(pixels.mean(1), target.mean(1), atol=0.02)
    assert torch.allclose(torch.cov(pixels), torch.cov(target), atol=0.005)


def test_time_budget_returns_the_best_image_so_far(extractor, content, style):
    """The budget is ten iterations of this machine, now; what it may overrun is counted in iterations of the
    same run: the one under way, the output scale's targets and the float32 loss of the result, each about one
    forward and backward pass or less. So it holds on a fast machine and a slow, shared one alike."""
    warm_up = []
    stylize(extractor, content, [style], params(steps=4, size=96, min_scale=96), callback=lambda progress:
            warm_up.append(time.perf_counter()))
    budget = 10 * max(b - a for a, b in zip(warm_up, warm_up[1:]))
    stamps, seen = [], []
    p = params(steps=10_000, size=96, min_scale=48, max_seconds=budget)
    result = stylize(extractor, content, [style], p, callback=lambda progress: (
        seen.append((progress.size, progress.loss["total"], progress.image.clone())),
        stamps.append(time.perf_counter())))
    assert result.stop_reason == "max_seconds" and result.stopped_early
    assert 0 < result.steps < 10_000 and result.image.shape == (3, 72, 96)
    longest = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert result.seconds < budget + 3 * longest
    at_output = [(loss, image) for size, loss, image in seen if size == (72, 96)]
    if at_output:  # the image returned is the best shown, which is the last shown
        assert torch.equal(result.image, at_output[-1][1])
    if result.precision == "fp32":  # the losses shown are the optimised ones, in float32
        best_shown = min([loss for loss, _ in at_output] or [result.initial_loss["total"]])
        assert result.final_loss["total"] == pytest.approx(best_shown, rel=1e-6)
    else:  # bf16 optimised and chose the best; the loss reported is the float32 one of that image
        float32 = total_loss(extractor, StyleJob(content, (style,), p), result.image, (72, 96))
        assert result.final_loss["total"] == pytest.approx(float32, rel=1e-5)


def test_early_stop_when_the_loss_stops_improving(extractor, content, style):
    result = stylize(extractor, content, [style], params(steps=500, early_stop_tol=0.2, early_stop_window=3))
    assert result.stop_reason == "converged" and result.steps < 100


def test_stop_below_a_target_loss(extractor, content, style):
    result = stylize(extractor, content, [style], params(steps=500, early_stop_tol=0), stop_below=100.0)
    assert result.stop_reason == "target_loss" and result.final_loss["total"] <= 100.0 and result.steps < 500


def test_coarse_to_fine_scales_and_progress(extractor, content, style):
    p = params(size=96, min_scale=24, steps=12, early_stop_tol=0)
    assert scale_sizes([StyleJob(content, (content,), p)], (72, 96)) == [(18, 24), (36, 48), (72, 96)]
    # starry_night is 1.6:1: at 24 px wide it would be 15 px high, too short for relu5_1 (16 px)
    assert scale_sizes([StyleJob(content, (style,), p)], (72, 96)) == [(36, 48), (72, 96)]
    seen = []
    result = stylize(extractor, content, [content.flip(-1)], p, callback=seen.append)
    assert [(s.step, s.scale, s.size) for s in seen] == (
        [(i, 1, (18, 24)) for i in range(1, 5)] + [(i, 2, (36, 48)) for i in range(5, 9)]
        + [(i, 3, (72, 96)) for i in range(9, 13)])
    assert all(s.steps == 12 and s.scales == 3 and s.item == 0 for s in seen)
    assert result.steps == 12 and result.image.shape == (3, 72, 96)


@pytest.mark.parametrize("init", ["content", "noise", "style"])
def test_a_finer_scale_never_starts_above_the_coarse_result_upsampled(extractor, content, style, init):
    """What the coarse scale did is kept: the finer scale's first loss is no higher than the coarse result's
    own loss at the finer size (its plain upsampling). Carrying only the coarse scale's change onto the finer
    scale's own start brought the noise of init=noise back (a start near the raw noise's loss), and clamping
    that change to [0, 1] lost every darkening and started 10 times higher."""
    p = params(size=96, min_scale=48, steps=20, early_stop_tol=0, precision="fp32", init=init, seed=3)
    seen = []
    stylize(extractor, content, [style], p, callback=seen.append)
    coarse_end = [progress for progress in seen if progress.scale == 1][-1]
    fine_start = next(progress for progress in seen if progress.scale == 2)
    coarse_at_fine_size = total_loss(extractor, StyleJob(content, (style,), p), coarse_end.image, fine_start.size)
    assert fine_start.loss["total"] <= coarse_at_fine_size * (1 + 1e-6)


def test_progress_shows_the_best_image_and_its_loss(extractor, content, style):
    """The streamed preview and the loss shown with it belong together: both are the best image's so far. An
    Adam step of 0.3 overshoots often, so the latest image is often not the best."""
    p = params(size=64, steps=8, optimizer="adam", lr=0.3, early_stop_tol=0, precision="fp32")
    seen = []
    stylize(extractor, content, [style], p, callback=lambda progress: seen.append(
        (progress.loss["total"], progress.image.clone(), progress.size)))
    for shown_loss, image, size in seen:
        assert total_loss(extractor, StyleJob(content, (style,), p), image, size) == pytest.approx(shown_loss,
                                                                                                  rel=1e-5)
    assert len({loss for loss, _, _ in seen}) < len(seen)  # some steps overshot: the best stayed


# Each image keeps its own Adam moments and its own L-BFGS history, so batching changes no arithmetic but
# the convolutions' summation order, which differs between batch sizes on some CPUs (AVX2 kernels) and not on
# others. Those last-bit differences (about 1e-7 relative) move an Adam step (lr * m / sqrt(v)) by next to
# nothing, except at the few pixels whose gradient is near zero, where its sign can flip: those may differ by
# up to 2 * lr per step. So with Adam 99 % of the pixels agree to 1e-5 (seen: 2e-7, and 0.14 % of them over
# 1e-4 on an AMD EPYC), all of them to 2 * lr * steps; images that swapped their targets would not. Under
# L-BFGS's fixed steps the differences grow with the iterations: pixels agree to 1e-4 over the first two (a
# shared history would already differ by far more there), and the losses stay within 1 % later.
@pytest.mark.parametrize("optimizer, steps, pixel_tolerance", [("adam", 10, 1e-5), ("lbfgs", 2, 1e-4),
                                                               ("lbfgs", 10, None)])
def test_a_batched_result_equals_the_solo_one(extractor, content, style, style2, optimizer, steps,
                                              pixel_tolerance):
    common = dict(optimizer=optimizer, steps=steps, early_stop_tol=0, precision="fp32")
    jobs = [StyleJob(content, (style,), params(**common)),
            StyleJob(content.flip(-1), (style2,), params(**common, init="noise", seed=3))]
    batched = stylize_batch(extractor, jobs)
    for job, together in zip(jobs, batched):
        alone = stylize_batch(extractor, [job])[0]
        difference = (together.image - alone.image).abs().flatten()
        if optimizer == "adam":
            assert difference.quantile(0.99) <= pixel_tolerance
            assert difference.max() <= 2 * 0.02 * steps  # Adam's default lr here
        elif pixel_tolerance is not None:
            assert difference.max() <= pixel_tolerance
        assert together.final_loss["total"] == pytest.approx(alone.final_loss["total"], rel=1e-2)
        assert together.steps == alone.steps == steps


def test_in_a_batch_each_image_stops_as_it_would_alone(extractor, content, style):
    """An image that has converged is held while the rest of its batch goes on: it returns what it would alone,
    after as many iterations, instead of running as long as the slowest image; and the rest goes on as it would
    beside an image that has not converged. (Beside, not alone: a batch of one sums the convolutions in another
    order on some CPUs, which 60 iterations of L-BFGS carry to a few percent of the loss.)"""
    common = dict(size=64, steps=60, early_stop_window=5, early_stop_tol=0.01, precision="fp32")
    done_at_once = StyleJob(content, (content,), params(**common))  # its loss is 0 from the start
    slower = StyleJob(content, (style,), params(**common))
    quick_alone = stylize_batch(extractor, [done_at_once])[0]
    slow_beside_itself = stylize_batch(extractor, [slower, slower])[0]
    quick, slow = stylize_batch(extractor, [done_at_once, slower])
    assert quick.stop_reason == quick_alone.stop_reason == "converged"
    assert quick.steps == quick_alone.steps < slow.steps == slow_beside_itself.steps
    assert torch.equal(quick.image, quick_alone.image) and quick.final_loss["total"] < 1e-9
    assert slow.final_loss["total"] == pytest.approx(slow_beside_itself.final_loss["total"], rel=1e-5)


def test_a_style_sent_again_comes_from_the_gram_cache(extractor, content, style):
    cache = GramCache(capacity=4)
    p = params(steps=3, size=64, min_scale=32, precision="fp32")  # two scales: two style sizes
    first = stylize(extractor, content, [style], p, gram_cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    again = stylize(extractor, content.flip(-1), [style], p, gram_cache=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    uncached = stylize(extractor, content.flip(-1), [style], p)
    assert torch.equal(again.image, uncached.image) and again.final_loss == uncached.final_loss
    stylize(extractor, content, [style], params(steps=1, size=64, min_scale=32, precision="fp32", pooling="avg"),
            gram_cache=cache)
    assert cache.misses == 4  # another pooling is another key
    assert not torch.equal(first.image, again.image)


@needs_bf16
def test_bf16_grams_are_cached_apart_from_float32_ones(extractor, content, style):
    cache = GramCache(capacity=4)
    stylize(extractor, content, [style], params(steps=1, size=64, min_scale=64, precision="fp32"), gram_cache=cache)
    stylize(extractor, content, [style], params(steps=1, size=64, min_scale=64, precision="bf16"), gram_cache=cache)
    # bf16 Grams for the loop are a new key; the float32 ones for the reported losses are the first call's
    assert (cache.hits, cache.misses) == (1, 2)


def test_each_style_image_is_hashed_once_per_request(extractor, content, style, style2, monkeypatch):
    """The cache key of a style image is taken once per request, not at every scale: on a GPU each digest
    copies the image to the host."""
    hashed = []
    digest = targets.image_digest
    monkeypatch.setattr(targets, "image_digest", lambda image: hashed.append(image.shape) or digest(image))
    p = params(steps=3, size=96, min_scale=24, precision="fp32")
    stylize(extractor, content, [content.flip(-1), content.flip(-2)], p, gram_cache=GramCache())
    assert len(hashed) == 2  # three scales, two style images


def test_images_are_reduced_to_what_the_optimisation_uses(content, style):
    from style_engine.targets import shrink_to_need

    big_content, big_style = torch.rand(3, 600, 800), torch.rand(3, 500, 1000)
    job = shrink_to_need(StyleJob(big_content, (big_style, style), params(size=64, style_scale=2.0)))
    assert job.content.shape == (3, 48, 64)
    assert job.styles[0].shape == (3, 64, 128)  # style_scale 2: twice the output's longer side
    assert job.styles[1] is style  # 96 px wide already fits under 128: never enlarged


def test_style_images_are_bounded_in_pixels_at_the_output_scale(extractor, content, style):
    """style_scale enlarges the style images before their Grams are taken, which no time budget interrupts:
    past max_style_pixels a request is refused, and the message names the largest style_scale that fits."""
    limit = 20_000
    with pytest.raises(TooLargeError) as error:
        check_job(StyleJob(content, (content.flip(-1), style), params(size=96, style_scale=4.0)), extractor, limit)
    assert str(error.value).startswith("style_scale 4 makes style 384x288 = 110592 px at size 96")
    with pytest.raises(TooLargeError) as error:
        check_job(StyleJob(content, (style,), params(size=96, style_scale=4.0)), extractor, limit)
    assert error.value.field == "style_scale" and error.value.status == 413
    largest = float(re.search(r"style_scale at most ([0-9.]+)", str(error.value)).group(1))
    check_job(StyleJob(content, (style,), params(size=96, style_scale=largest)), extractor, limit)
    with pytest.raises(TooLargeError):
        check_job(StyleJob(content, (style,), params(size=96, style_scale=largest + 0.01)), extractor, limit)


def test_auto_precision_picks_bf16_only_on_devices_with_native_bf16(monkeypatch):
    """A T4 (compute capability 7.5) emulates bf16, an A100 (8.0) runs it natively; each worker asks about its
    own device, whichever is current."""
    capabilities = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device.index])
    large = 512 * 512
    assert precision.use_bf16("auto", torch.device("cuda:1"), large) is True
    assert precision.use_bf16("auto", torch.device("cuda:0"), large) is False
    assert precision.use_bf16("bf16", torch.device("cuda:0"), large) is False  # emulated: float32 instead
    assert precision.use_bf16("auto", torch.device("cuda:1"), 48 * 64) is False  # tiny: bf16 saves nothing
    assert precision.use_bf16("fp32", torch.device("cuda:1"), large) is False


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_on_the_cpu_follows_its_bf16_support(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert precision.use_bf16("auto", cpu, 256 * 192) is native
    assert precision.use_bf16("bf16", cpu, 256 * 192) is native
    assert precision.use_bf16("auto", cpu, 64 * 48) is False


def test_bf16_asked_for_without_native_bf16_runs_float32_and_says_so(extractor, content, style, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    asked = stylize(extractor, content, [style], params(steps=3, precision="bf16"))
    plain = stylize(extractor, content, [style], params(steps=3, precision="fp32"))
    assert asked.precision == plain.precision == "fp32"
    assert torch.equal(asked.image, plain.image)


@pytest.mark.parametrize("forced, native", [("fp32", False), ("bf16", True), ("", precision.cpu_flags_have_bf16())])
def test_the_forced_precision_overrides_the_cpus_flags(forced, native):
    """STYLE_FORCE_PRECISION (read once, in precision.py) is how the suite runs the other CPU's paths here."""
    before = os.environ.get(precision.FORCE_PRECISION_ENV)
    try:
        os.environ[precision.FORCE_PRECISION_ENV] = forced
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.cpu_has_native_bf16() is native
        assert precision.use_bf16("auto", torch.device("cpu"), 256 * 256) is native
        os.environ[precision.FORCE_PRECISION_ENV] = "float32"
        precision.cpu_has_native_bf16.cache_clear()
        with pytest.raises(ValueError, match="STYLE_FORCE_PRECISION must be fp32, bf16 or unset"):
            precision.cpu_has_native_bf16()
    finally:
        os.environ.pop(precision.FORCE_PRECISION_ENV, None)
        if before is not None:
            os.environ[precision.FORCE_PRECISION_ENV] = before
        precision.cpu_has_native_bf16.cache_clear()



def test_float32_has_no_tf32_in_the_backward_pass_nor_the_recompute(extractor, content, style):
    """On a GPU, PyTorch lets cuDNN run float32 convolutions in TF32 unless told not to; precision fp32 means
    float32 in every convolution and product of a step: the forward pass, the backward pass (hooks on each
    convolution's output) and, checkpointed, the convolutions run again inside the backward pass. The flags
    act only on a GPU; they are read here, on the CPU, while each part runs."""
    def tf32():
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    before, forward, backward = tf32(), [], []

    def on_forward(module, inputs, output):
        forward.append(tf32())
        if output.requires_grad:
            output.register_hook(lambda grad: backward.append(tf32()))

    hooks = [m.register_forward_hook(on_forward) for m in extractor.modules() if isinstance(m, torch.nn.Conv2d)]
    runs = {}
    try:
        for checkpoint in (False, True):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as a host may set
            stylize(extractor, content, [style], params(steps=2, min_scale=64, precision="fp32"),
                    checkpoint=checkpoint)
            runs[checkpoint] = len(forward)
            assert tf32() == (True, True)  # the host's settings are given back
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        for hook in hooks:
            hook.remove()
    assert backward and set(forward) == set(backward) == {(False, False)}
    # checkpointed, the iterations' convolutions ran again in their backward passes, and were seen there
    assert runs[True] - runs[False] > runs[False]


def test_should_stop_cancels_within_one_iteration_at_a_coarse_scale(extractor, content, style):
    """Asked at the coarse scale, the image stops there for good: no later scale optimises it, and its result is
    the coarse image brought up to the output size, with the loss of what is returned."""
    p = params(size=96, min_scale=24, steps=40, early_stop_tol=0, precision="fp32")
    seen, asked = [], []
    result = stylize(extractor, content, [content.flip(-1)], p, callback=seen.append,
                     should_stop=lambda item: asked.append(item) or len(seen) >= 3)
    assert result.stop_reason == "canceled" and result.steps == 3
    assert [s.step for s in seen] == [1, 2, 3] and asked == [0, 0, 0, 0]
    assert result.image.shape == (3, 72, 96)
    objective_loss = total_loss(extractor, StyleJob(content, (content.flip(-1),), p), result.image, (72, 96))
    assert result.final_loss["total"] == pytest.approx(objective_loss, rel=1e-4)


def test_should_stop_cancels_one_image_of_a_batch_and_the_others_go_on(extractor, content, style):
    common = dict(size=64, steps=12, early_stop_tol=0, precision="fp32")
    jobs = [StyleJob(content, (style,), params(**common)), StyleJob(content.flip(-1), (style,), params(**common))]
    alone = stylize_batch(extractor, [jobs[0]])[0]
    calls = []
    kept, canceled = stylize_batch(extractor, jobs, should_stop=lambda item: calls.append(item) or
                                   (item == 1 and calls.count(1) > 5))
    assert canceled.stop_reason == "canceled" and canceled.steps == 5 and canceled.image.shape == (3, 48, 64)
    assert kept.stop_reason == "steps" and kept.steps == 12
    assert kept.final_loss["total"] == pytest.approx(alone.final_loss["total"], rel=1e-2)
