"""Localized passes (style_engine/localized.py): by tiles, the same losses and gradient as a full pass, for every
term and option of the objective, and the same optimisation."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import PRECISIONS, ROOT, SAMPLES, STYLES, sample
from style_engine import StyleJob, parse_params, stylize
from style_engine.localized import LocalizedPass, tiles
from style_engine.precision import extractor_precision
from style_engine.targets import build_objective

# Several tiles each way with margins inside the image: 64 px owned tiles of a 160 x 120 px image, whose
# margin at the default layers (80 px) reaches past the neighbouring tile.
SIZE, TILE = (120, 160), 64
OPTIONS = {
    "default": {},
    "tv and style_blend": {"tv_weight": 50.0, "style_blend": [0.3, 0.7]},
    "avg pooling, conv layers": {"pooling": "avg", "content_layer": "conv4_2",
                                 "style_layers": {"conv1_1": 1.0, "conv3_1": 0.5, "conv5_1": 2.0}},
    "shallow layers": {"content_layer": "relu2_2", "style_layers": {"relu1_1": 1.0, "relu2_1": 0.0}},
    "the deepest layer alone": {"content_layer": "conv5_1", "style_layers": {"relu5_1": 1.0}},
    "preserve_color histogram": {"preserve_color": "histogram", "content_weight": 0.0},
}


def _job(content, style, style2, masks: int = 0, **options) -> StyleJob:
    params = parse_params({"size": max(SIZE), "style_weight": 1e4, **options})[0]
    styles = (style, style2) if "style_blend" in options or masks else (style,)
    strips = tuple(_strip(k, masks) for k in range(masks))
    return StyleJob(content, styles, params, strips)


def _strip(k: int, count: int) -> torch.Tensor:
    """A soft mask: white on the k-th of `count` vertical strips, fading across the image."""
    ramp = torch.linspace(0, 1, SIZE[1])
    mask = ((ramp * count).floor() == k).float() * 0.6 + ramp * 0.4
    return mask.expand(1, *SIZE).clone()


def _losses_and_gradient(extractor, objective, x, tile):
    image = x.clone().requires_grad_(True)
    pooling = objective.pooling

    def run_pass(images, layers):
        with extractor_precision(images.device, False):
            return extractor(images, layers, pooling)

    if tile is None:
        losses = objective(run_pass(image, objective.layers), image)
        losses.total.sum().backward()
    else:
        losses = LocalizedPass(objective, run_pass, tile).evaluate(image, grad=True)
    return torch.stack(losses.terms()).detach(), image.grad


@pytest.fixture(scope="module")
def images():
    content = sample("tubingen.jpg", max(SIZE))
    return content[:, :SIZE[0], :SIZE[1]], sample("styles/starry_night.jpg", 96), sample("styles/shipwreck.jpg", 80)


def _objective(extractor, job, tile=None):
    objective = build_objective(extractor, [job], SIZE, SIZE, bf16=False, tile=tile)
    objective.pooling = job.params.pooling
    return objective


@pytest.mark.parametrize("option", OPTIONS)
def test_the_tiled_gradient_is_the_full_one(extractor, images, option):
    content, style, style2 = images
    job = _job(content, style, style2, **OPTIONS[option])
    assert len(tiles(SIZE, TILE, _objective(extractor, job).layers)) == 6
    x = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    full_losses, full = _losses_and_gradient(extractor, _objective(extractor, job), x, None)
    tiled_losses, tiled = _losses_and_gradient(extractor, _objective(extractor, job), x, TILE)
    assert torch.allclose(tiled_losses, full_losses, rtol=1e-5, atol=0)
    assert (tiled - full).norm() <= 1e-5 * full.norm()


@pytest.mark.parametrize("masks", [1, 2])
def test_the_tiled_gradient_is_the_full_one_with_masks(extractor, images, masks):
    content, style, style2 = images
    job = _job(content, style, style2, masks=masks, tv_weight=10.0)
    x = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    full_losses, full = _losses_and_gradient(extractor, _objective(extractor, job), x, None)
    tiled_losses, tiled = _losses_and_gradient(extractor, _objective(extractor, job), x, TILE)
    assert torch.allclose(tiled_losses, full_losses, rtol=1e-5, atol=0)
    assert (tiled - full).norm() <= 1e-5 * full.norm()


def test_the_targets_taken_by_tiles_are_the_full_ones(extractor, images):
    """The content target assembled by the first localized pass, the style Grams summed over tiles (the style
    image at style_scale 1.5 is larger than the output: split too)."""
    content, style, style2 = images
    job = _job(content, style, style2, style_scale=1.5, style_blend=[1.0, 2.0])
    full, tiled = _objective(extractor, job), _objective(extractor, job, tile=TILE)
    assert tiled.content_target is None
    _losses_and_gradient(extractor, tiled, content.unsqueeze(0), TILE)
    assert torch.allclose(tiled.content_target, full.content_target, rtol=1e-5, atol=1e-6)
    for layer in full.style_layer_weights:
        tiled_gram, full_gram = getattr(tiled, f"gram_{layer}"), getattr(full, f"gram_{layer}")
        assert (tiled_gram - full_gram).norm() <= 1e-5 * full_gram.norm()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_optimisation_by_tiles_ends_where_the_full_one_does(extractor, images, precision):
    """Coarse to fine (80 then 160 px, both split), the finer scale's start chosen by tiles too; shallow layers,
    whose margin is narrow, keep it cheap. In bf16 the tiles round differently: the same within its precision."""
    content, style, _ = images
    tolerance = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 0.1)}[precision]  # final loss (relative), pixels
    params = parse_params({"size": 160, "min_scale": 80, "steps": 6, "early_stop_tol": 0, "tv_weight": 5.0,
                           "precision": precision,
                           "content_layer": "relu3_1", "style_layers": {"relu1_1": 1.0, "relu2_1": 1.0,
                                                                         "relu3_1": 1.0}})[0]
    full = stylize(extractor, content, [style], params)
    tiled = stylize(extractor, content, [style], params, tile=TILE)
    assert tiled.steps == full.steps == 6 and tiled.precision == full.precision == precision
    assert tiled.final_loss == pytest.approx(full.final_loss, rel=tolerance[0])
    assert (tiled.image - full.image).abs().max() <= tolerance[1]


def measure_passes(requests: list[dict]) -> list[int]:
    """benchmarks/probe.py pass in a fresh process: the measured peak, in bytes, of one iteration's pass of each
    request, in turn."""
    command = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), "pass", "random", str(SAMPLES / "tubingen.jpg"),
               str(STYLES / "starry_night.jpg"), *(json.dumps(request) for request in requests)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return [json.loads(line)["measured"] for line in run.stdout.splitlines()]


def test_the_peak_of_a_localized_pass_follows_the_tile_not_the_image():
    """At twice the side a full pass needs about four times the memory; a localized pass grows no more than its
    largest tile (with the margin) does, but for the image's own gradient. Shallow layers keep the margin, and
    the test, small; the tiles (128 px at most) differ in shape at the two sizes, as their balanced split does."""
    layers = {"content_layer": "relu3_1", "style_layers": {"relu1_1": 1, "relu2_1": 1, "relu3_1": 1}}
    shapes, localized = {192: (144, 192), 384: (288, 384)}, {"passes": "localized", "tile": 128}  # tubingen's
    full_small, full_large, tiled_small, tiled_large = measure_passes(
        [{"size": size, **layers, **mode} for mode in ({}, localized) for size in shapes])
    largest = {size: max((part.run[1] - part.run[0]) * (part.run[3] - part.run[2])
                         for part in tiles(shape, 128, ["relu3_1", "relu1_1", "relu2_1"]))
               for size, shape in shapes.items()}
    image_growth = 3 * 4 * (288 * 384 - 144 * 192)  # float32 RGB
    assert full_large > 3 * full_small  # the measurement sees what grows with the image
    assert tiled_large <= 1.1 * tiled_small * largest[384] / largest[192] + 2 * image_growth
    assert tiled_large < full_large / 4
