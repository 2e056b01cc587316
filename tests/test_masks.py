"""Masks (spatial control, Gatys et al. 2017), the start image and the preset pool of the Gram cache, in the engine."""

import pytest
import torch

from style_engine import StyleJob, batch_key, stylize, stylize_batch
from style_engine.codec import encode_image
from style_engine import losses
from style_engine.losses import gram_matrix
from style_engine.resize import resize, resize_mask
from style_engine.targets import GramCache, build_objective, mask_at_layer
from conftest import PRECISIONS
from test_optimize import params

OUTPUT = (48, 64)  # the 96x72 content at size 64


def white(height=30, width=50):
    return torch.ones(1, height, width)


def halves(height=48, width=64):
    """Complementary masks: the left half, and the right half."""
    left = torch.zeros(1, height, width)
    left[..., : width // 2] = 1
    return left, 1 - left


def guided_style_loss(extractor, content, style, mask, image, p) -> float:
    """The style loss of `image` (3, 48, 64) against `style` in the region of `mask` alone: the one-style
    objective with that mask, at the output size, in float32."""
    objective = build_objective(extractor, [StyleJob(content, (style,), p, (mask,))], OUTPUT, OUTPUT, bf16=False)
    with torch.no_grad():
        return objective(extractor(image[None], objective.layers, p.pooling), image[None]).style.item()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_all_white_mask_equals_no_mask(extractor, content, style, precision):
    """Of another size than the output, over two scales: resampled, it stays exactly white, and the guided
    objective is then the seed's, operation for operation."""
    p = params(size=96, min_scale=48, steps=10, precision=precision)
    plain = stylize(extractor, content, [style], p)
    # whatever its style_blend weight: normalised to a sum of 1, as without masks
    masked = stylize(extractor, content, [style], params(size=96, min_scale=48, steps=10, precision=precision,
                                                         style_blend=[2.5]), masks=[white()])
    for term in ("content", "style", "total"):
        assert masked.initial_loss[term] == pytest.approx(plain.initial_loss[term], rel=1e-5)
        assert masked.final_loss[term] == pytest.approx(plain.final_loss[term], rel=1e-5)
    assert encode_image(masked.image) == encode_image(plain.image)


def test_a_white_and_a_black_mask_equal_the_first_style_alone_at_its_share(extractor, content, style, style2):
    """A black mask takes its style's term out, not its share of the style weight: the first style pulls at
    half the weight, as a mask that is nearly black would have it (no jump in between)."""
    p = params(steps=10)
    alone = stylize(extractor, content, [style], params(steps=10, style_weight=p.style_weight / 2))
    masked = stylize(extractor, content, [style, style2], p, masks=[white(), torch.zeros(1, 10, 10)])
    for term in ("content", "style", "total"):
        assert masked.initial_loss[term] == pytest.approx(alone.initial_loss[term], rel=1e-5)
        assert masked.final_loss[term] == pytest.approx(alone.final_loss[term], rel=1e-5)


def test_complementary_masks_each_region_takes_its_own_style(extractor, content, style, style2):
    p = params(steps=30, early_stop_tol=0, precision="fp32")
    masks = halves()
    result = stylize(extractor, content, [style, style2], p, masks=masks)
    assert result.steps == 30
    start = resize(content, OUTPUT)
    for own, mask in zip((style, style2), masks):
        before = guided_style_loss(extractor, content, own, mask, start, p)
        after = guided_style_loss(extractor, content, own, mask, result.image, p)
        assert after <= 0.2 * before, (before, after)


def test_with_masks_style_blend_weighs_each_styles_term_by_its_share(extractor, content, style, style2):
    """Not a blend of Grams: each style's own term (that of the request with its mask alone) weighed by its
    share of style_blend, so that the weights sum to 1 as they do without masks."""
    p = params(steps=1)
    left, right = halves()
    alone = [stylize(extractor, content, [own], p, masks=[mask]).initial_loss["style"]
             for own, mask in ((style, left), (style2, right))]
    weighed = stylize(extractor, content, [style, style2], params(steps=1, style_blend=[3, 1]), masks=[left, right])
    assert weighed.initial_loss["style"] == pytest.approx(0.75 * alone[0] + 0.25 * alone[1], rel=1e-5)
    only_first = stylize(extractor, content, [style, style2], params(steps=1, style_blend=[3, 0]), masks=[left, right])
    assert only_first.initial_loss["style"] == pytest.approx(alone[0], rel=1e-5)


def test_masks_leave_the_total_style_weight_as_it_is(extractor, content, style):
    """The same style twice is that style once, with masks as without: the terms' weights sum to 1. Adding an
    all-white mask_1 to the two-style request used to double its style term."""
    p = params(steps=1)
    once = stylize(extractor, content, [style], p).initial_loss["style"]
    twice = stylize(extractor, content, [style, style], p).initial_loss["style"]
    masked = stylize(extractor, content, [style, style], p, masks=[white()]).initial_loss["style"]
    assert twice == pytest.approx(once, rel=1e-5) and masked == pytest.approx(once, rel=1e-5)


def test_a_uniform_grey_mask_scales_the_style_term_by_its_square(extractor, content, style):
    """With a mask of c everywhere, the guided Gram is c^2 G and its target c^2 times the unmasked one
    ((sum_p m^2) / N * A); normalised by the region's size, c^2 h w, the term is c^2 times the seed's.
    Normalised by h*w instead it would be c^4 times, and a target without the factor would not scale."""
    p, c = params(precision="fp32"), 128 / 255
    image = torch.rand(1, 3, *OUTPUT, generator=torch.Generator().manual_seed(0))
    losses = []
    for masks in ((), (torch.full((1, *OUTPUT), c),)):
        objective = build_objective(extractor, [StyleJob(content, (style,), p, masks)], OUTPUT, OUTPUT, bf16=False)
        with torch.no_grad():
            losses.append(objective(extractor(image, objective.layers), image).style.item())
    assert losses[1] == pytest.approx(c**2 * losses[0], rel=1e-4)


def test_a_mask_reaches_each_layer_as_the_fraction_of_its_block_inside_the_region():
    """7x6 pixels, one pooling before relu2_1: 3x3 positions of 2x2 pixels, the last row dropped as the
    network drops it; relu3_1 (two poolings) has one position, the 4x4 block at the top left."""
    mask = torch.zeros(1, 1, 7, 6)
    mask[..., 0, 0] = 1  # a quarter of the first block
    mask[..., 2:4, 2:4] = 1  # all of the middle block
    mask[..., 6, :] = 1  # the row no position covers
    assert mask_at_layer(mask, "relu1_1") is mask
    assert mask_at_layer(mask, "relu2_1")[0, 0].tolist() == [[0.25, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert mask_at_layer(mask, "relu3_1")[0, 0].tolist() == [[(1 + 4) / 16]]


def test_resized_masks_keep_white_and_black_exact_and_stay_in_range():
    hard = torch.zeros(1, 97, 131)
    hard[..., 40:, 50:] = 1
    for size in ((48, 64), (33, 45), (200, 300)):
        resized = resize_mask(hard, size)
        assert resized.shape == (1, *size) and 0 <= resized.min() and resized.max() <= 1
        assert resized[..., 0, 0].item() == 0 and resized[..., -1, -1].item() == 1
        assert torch.equal(resize_mask(white(97, 131), size), torch.ones(1, *size))
        assert torch.equal(resized * 255, (resized * 255).round())  # 8-bit levels


def test_guided_grams_are_float32_under_bf16_autocast():
    features, masks = torch.randn(2, 4, 5, 6), torch.rand(2, 3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grams = gram_matrix(features.bfloat16(), masks.square())
    assert grams.dtype == torch.float32 and grams.shape == (2, 3, 4, 4)
    flat = features.bfloat16().float().reshape(2, 4, 30)
    expected = torch.einsum("bcp,bkp,bdp->bkcd", flat, masks.reshape(2, 3, 30) ** 2, flat)
    torch.testing.assert_close(grams, expected)


@pytest.mark.parametrize("guided", [False, True])
def test_the_tiled_grams_gradient_is_autograds(monkeypatch, guided):
    """Over several tiles: at 4 channels, 32 bytes of float32 are 2 positions per tile."""
    monkeypatch.setattr(losses, "GRAM_TILE_BYTES", 32)
    features = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    masks = torch.rand(2, 3, 3, 5) if guided else None
    upstream = torch.randn(2, 3, 4, 4) if guided else torch.randn(2, 4, 4)
    (gram_matrix(features, None if masks is None else masks.square()) * upstream).sum().backward()
    ours = features.grad.clone()
    features.grad = None
    flat = features.reshape(2, 4, 15)
    if guided:
        weighted = flat.unsqueeze(1) * masks.reshape(2, 3, 1, 15)  # F * m_k
        reference = weighted @ weighted.transpose(-2, -1)
    else:
        reference = flat @ flat.transpose(-2, -1)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours, features.grad, rtol=1e-5, atol=1e-6)


def test_masked_jobs_share_a_batch_only_with_masked_jobs_of_as_many_styles(content, style, style2):
    p = params()
    plain = StyleJob(content, (style,), p)
    assert batch_key(StyleJob(content, (style, style2), p)) == batch_key(plain)  # one blended Gram each
    one_mask = StyleJob(content, (style, style2), p, (white(),))
    assert batch_key(one_mask) != batch_key(plain)
    assert batch_key(one_mask) == batch_key(StyleJob(content.flip(-1), (style2, style), p, halves()))
    assert batch_key(one_mask) != batch_key(StyleJob(content, (style,), p, (white(),)))


def test_a_batch_of_masked_jobs_answers_each_as_if_alone(extractor, content, style, style2):
    p = params(steps=5, early_stop_tol=0, precision="fp32")
    jobs = [StyleJob(content, (style, style2), p, halves()),
            StyleJob(content.flip(-1), (style2, style), p, (halves()[1],))]
    for job, together in zip(jobs, stylize_batch(extractor, jobs)):
        alone = stylize_batch(extractor, [job])[0]
        assert together.final_loss["total"] == pytest.approx(alone.final_loss["total"], rel=1e-2)
        assert together.initial_loss["total"] == pytest.approx(alone.initial_loss["total"], rel=1e-5)


def test_masked_requests_use_the_same_cached_style_grams(extractor, content, style):
    cache = GramCache(capacity=4)
    p = params(steps=2, precision="fp32")
    stylize(extractor, content, [style], p, gram_cache=cache)
    stylize(extractor, content, [style], p, masks=halves()[:1], gram_cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)


def test_init_image_of_the_content_equals_init_content(extractor, content, style):
    from_content = stylize(extractor, content, [style], params(steps=5))
    from_image = stylize(extractor, content, [style], params(steps=5, init="image"), init_image=content.clone())
    assert torch.equal(from_image.image, from_content.image) and from_image.final_loss == from_content.final_loss


def test_init_image_is_stretched_to_the_output_and_refines_an_earlier_result(extractor, content, style):
    small = stylize(extractor, content, [style], params(size=48, steps=10))
    larger = stylize(extractor, content, [style], params(size=64, steps=3, init="image"), init_image=small.image)
    from_content = stylize(extractor, content, [style], params(size=64, steps=3))
    assert larger.image.shape == (3, *OUTPUT)
    assert larger.initial_loss["style"] < from_content.initial_loss["style"]


def test_preset_grams_stay_cached_however_many_uploads_follow(extractor, content, style, style2):
    cache = GramCache(capacity=1, pinned_capacity=4)
    with_preset = params(steps=1, presets=["starry_night"], precision="fp32")
    stylize(extractor, content, [style2, style], with_preset, gram_cache=cache)  # style is the preset
    for seed in range(3):  # each upload evicts the previous one, and the upload of the first request
        stylize(extractor, content, [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed))],
                params(steps=1, precision="fp32"), gram_cache=cache)
    hits = cache.hits
    stylize(extractor, content, [style], with_preset, gram_cache=cache)  # the preset alone
    assert cache.hits == hits + 1
    stylize(extractor, content, [style2], params(steps=1, precision="fp32"), gram_cache=cache)
    assert cache.hits == hits + 1  # the upload of the first request is long gone


def test_the_preset_pool_is_bounded_too():
    cache = GramCache(capacity=1, pinned_capacity=2)
    for key in "abc":
        cache.get(key, lambda: key, pinned=True)
    cache.get("a", lambda: "again", pinned=True)
    assert (cache.hits, cache.misses) == (0, 4)  # "a", the oldest, had gone
    assert cache.get("c", lambda: "again", pinned=True) == "c" and cache.hits == 1
