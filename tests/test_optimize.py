"""The optimisation loop: what it converges to, when it stops, and that batching changes nothing."""

import pytest
import torch

from style_engine import ImageError, ParamError, StyleJob, parse_params, stylize, stylize_batch
from style_engine.codec import encode_image
from style_engine.color import match_colors, rgb_to_yiq
from style_engine.optimize import scale_sizes
from style_engine.resize import resize


def params(**overrides):
    return parse_params({"size": 64, "steps": 30, **overrides})[0]


def test_style_equal_to_content_starting_from_content_has_zero_loss(extractor, content):
    result = stylize(extractor, content, [content], params(steps=3))
    assert result.initial_loss["total"] == 0.0 and result.final_loss["total"] == 0.0
    assert torch.equal(result.image, resize(content, (48, 64)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_style_loss_falls_by_90_percent_within_30_lbfgs_steps(extractor, content, style, precision):
    result = stylize(extractor, content, [style], params(steps=30, early_stop_tol=0, precision=precision))
    assert result.steps == 30 and result.stop_reason == "steps"
    assert result.final_loss["style"] <= 0.1 * result.initial_loss["style"]
    assert result.image.shape == (3, 48, 64) and 0 <= result.image.min() and result.image.max() <= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
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


def test_histogram_matching_gives_the_style_the_contents_colour_statistics(content, style):
    recoloured = match_colors(style, content)
    pixels, target = recoloured.flatten(1), content.flatten(1)
    assert torch.allclose(pixels.mean(1), target.mean(1), atol=0.02)
    assert torch.allclose(torch.cov(pixels), torch.cov(target), atol=0.005)


def test_time_budget_returns_the_best_image_so_far(extractor, content, style):
    result = stylize(extractor, content, [style], params(steps=10_000, max_seconds=2.0, size=96, min_scale=48))
    assert result.stop_reason == "max_seconds" and result.stopped_early
    assert 0 < result.steps < 10_000 and result.seconds < 2.0 + 1.0  # overshoot: at most one step, one forward
    assert result.image.shape == (3, 72, 96)
    assert result.final_loss["total"] < result.initial_loss["total"]


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
    assert result.final_loss["total"] < result.initial_loss["total"]


# Each image keeps its own Adam moments and its own L-BFGS history, so batching changes no arithmetic but
# the convolutions' summation order. Under L-BFGS (a fixed step, no line search) those last-bit differences
# grow with the iterations: pixels agree to 1e-4 over the first steps (a shared history would already differ
# by far more at step 2), and the losses stay within 1 % later (README, "The method": Batching).
@pytest.mark.parametrize("optimizer, steps, pixel_tolerance", [("adam", 10, 1e-4), ("lbfgs", 2, 1e-4),
                                                               ("lbfgs", 10, None)])
def test_a_batched_result_equals_the_solo_one(extractor, content, style, style2, optimizer, steps,
                                              pixel_tolerance):
    common = dict(optimizer=optimizer, steps=steps, early_stop_tol=0, precision="fp32")
    jobs = [StyleJob(content, (style,), params(**common)),
            StyleJob(content.flip(-1), (style2,), params(**common, init="noise", seed=3))]
    batched = stylize_batch(extractor, jobs)
    for job, together in zip(jobs, batched):
        alone = stylize_batch(extractor, [job])[0]
        if pixel_tolerance is not None:
            torch.testing.assert_close(together.image, alone.image, atol=pixel_tolerance, rtol=0)
        assert together.final_loss["total"] == pytest.approx(alone.final_loss["total"], rel=1e-2)


def test_a_style_sent_again_comes_from_the_gram_cache(extractor, content, style):
    from style_engine.targets import GramCache

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
    stylize(extractor, content, [style], params(steps=1, size=64, min_scale=64, precision="bf16"), gram_cache=cache)
    # bf16 Grams for the loop are a new key; the float32 ones for the reported losses are the first call's
    assert (cache.hits, cache.misses) == (3, 5)
    assert not torch.equal(first.image, again.image)


def test_images_are_reduced_to_what_the_optimisation_uses(content, style):
    from style_engine.targets import shrink_to_need

    big_content, big_style = torch.rand(3, 600, 800), torch.rand(3, 500, 1000)
    job = shrink_to_need(StyleJob(big_content, (big_style, style), params(size=64, style_scale=2.0)))
    assert job.content.shape == (3, 48, 64)
    assert job.styles[0].shape == (3, 64, 128)  # style_scale 2: twice the output's longer side
    assert job.styles[1] is style  # 96 px wide already fits under 128: never enlarged


def test_auto_precision_is_bf16_only_where_it_pays():
    from style_engine.precision import cpu_has_native_bf16, use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("fp32", cpu, 10**6) is False and use_bf16("bf16", cpu, 16) is True
    assert use_bf16("auto", cpu, 64 * 48) is False  # tiny outputs: no faster per step, and a second set of targets
    assert use_bf16("auto", cpu, 256 * 192) is cpu_has_native_bf16()
