"""The memory model (style_engine/memory.py) against measured peaks, the checkpointed path against the plain one,
and admission: what cannot fit is refused before any work, naming the largest size that fits."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SAMPLES, STYLES, needs_bf16, needs_fast_bf16, sample
from style_engine import NotEnoughMemory, StyleJob, parse_params, stylize
from style_engine.memory import Passes, admit, fitting_mode, peak_bytes, workload
from style_engine.resize import fit_longer_side

CPU = torch.device("cpu")
# A request whose peak the model must know within 20 %: the default schedule (coarse to fine from 128 px), one
# iteration per scale, since memory per iteration does not grow with their number.
MEASURED = {"steps": 4, "early_stop_tol": 0}
PRECISIONS = ["fp32", pytest.param("bf16", marks=needs_fast_bf16)]
PRECISIONS_SMALL = ["fp32", pytest.param("bf16", marks=needs_bf16)]  # small enough to run bf16 emulated
# Measured up to 512 px; the largest size a CPU worker serves, 1024 px, only through the measured peak's growth:
# four times the work of 512 px, for a peak that grows with the pixels like every term of the model.
MEASURED_SIZES, LARGEST_SIZE = (512, 384, 256), 1024
LINEARITY = 0.03  # how far the middle size's peak may lie off the line through the outer two, relatively


@pytest.fixture(scope="module")
def weights_file(random_state_dict, tmp_path_factory) -> Path:
    """The random weights (`--weights random`) as a file: each fresh process loads them rather than
    building VGG19 again; the memory they use is the same."""
    path = tmp_path_factory.mktemp("weights") / "vgg19_features.pth"
    torch.save(random_state_dict, path)
    return path


def measure(weights: Path, params: dict, checkpoint: bool = False, masks: int = 0) -> dict:
    """benchmarks/probe.py in a fresh process: the measured peak and the model's estimate, in bytes; with
    `masks`, that many styles, each in its own strip."""
    return measure_in_turn(weights, [params], checkpoint, masks)[0]


def measure_in_turn(weights: Path, requests: list[dict], checkpoint: bool = False, masks: int = 0) -> list[dict]:
    """measure() of each request, one after the other in one fresh process, after a small one in the first's
    precision whose figures are dropped: the first request of a process pays for allocations made once (the
    libraries' caches; on some CPUs tens of MB above the peak), which a worker has made before it serves."""
    warm_up = {"size": 64, "steps": 1, "precision": requests[0].get("precision", "auto")}
    command = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), "memory", str(weights),
               str(SAMPLES / "tubingen.jpg"), str(STYLES / "starry_night.jpg"),
               *(json.dumps(params) for params in [warm_up, *requests]), "--masks", str(masks)]
    run = subprocess.run(command + (["--checkpoint"] if checkpoint else []), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()][1:]


def estimate(params: dict, masks: int = 0) -> int:
    """The model's estimate of the request benchmarks/probe.py measures, without running it."""
    content, style = sample("tubingen.jpg"), sample("styles/starry_night.jpg")
    masking = tuple(torch.ones(1, *content.shape[-2:]) for _ in range(masks))
    job = StyleJob(content, (style,) * max(1, masks), parse_params(params)[0], masking)
    return peak_bytes(workload([job], CPU))


def pixels(size: int) -> int:
    height, width = fit_longer_side(*sample("tubingen.jpg").shape[-2:], size)
    return height * width


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_estimate_is_within_20_percent_of_the_measured_peak_and_of_its_growth_to_the_largest_size(
        weights_file, precision):
    """Measured at three sizes in one process. The peak grows linearly with the pixels (the middle size lies
    on the line through the others), so the line's value at the largest size is what would be measured there."""
    requests = [{**MEASURED, "size": size, "precision": precision} for size in MEASURED_SIZES]
    peaks = dict(zip(MEASURED_SIZES, measure_in_turn(weights_file, requests)))
    for size, peak in peaks.items():
        assert peak["estimated"] == pytest.approx(peak["measured"], rel=0.2), size
    (large, measured_large), (middle, measured_middle), (small, measured_small) = (
        (pixels(size), peaks[size]["measured"]) for size in MEASURED_SIZES)
    per_pixel = (measured_large - measured_small) / (large - small)
    assert measured_middle == pytest.approx(measured_small + per_pixel * (middle - small), rel=LINEARITY)
    at_largest = measured_small + per_pixel * (pixels(LARGEST_SIZE) - small)
    assert estimate({**MEASURED, "size": LARGEST_SIZE, "precision": precision}) == pytest.approx(at_largest, rel=0.2)


def test_the_estimate_is_within_20_percent_of_the_measured_peak_by_tiles(weights_file):
    """A localized request, its style targets by tiles too: 2 x 2 tiles of 128 px at 256 px (one scale)."""
    peak = measure(weights_file, {**MEASURED, "steps": 2, "size": 256, "min_scale": 256, "precision": "fp32",
                                  "passes": "localized", "tile": 128})
    assert peak["estimated"] == pytest.approx(peak["measured"], rel=0.2)


# style_scale up to the parameter's bound, 4, which at 128 px is within the CPU's max_style_pixels (2 MP: there
# style_scale 4 is allowed up to size 362); then size 256. Over this range each phase of the model leads
# somewhere: the optimisation at the small style_scales, the style targets at the large ones, and in bf16 the
# float32 targets of the reported losses. In one process.
IN_TURN = [{"size": 128, "style_scale": scale} for scale in (4, 3, 2, 1, 0.5)] + [{"size": 256, "style_scale": 1}]


@pytest.mark.parametrize("precision", PRECISIONS_SMALL)
def test_the_estimate_is_within_20_percent_of_the_measured_peak_at_every_style_scale(weights_file, precision):
    requests = [{**MEASURED, **request, "precision": precision} for request in IN_TURN]
    for request, peak in zip(IN_TURN, measure_in_turn(weights_file, requests)):
        assert peak["estimated"] == pytest.approx(peak["measured"], rel=0.2), request


def test_the_estimate_of_a_request_with_four_masks_is_within_20_percent_of_the_measured_peak(weights_file):
    """At 256 px: what the masks add (each style's targets and guided Gram, its mask at every style layer) grows
    with the pixels or is fixed (the guided Grams' tiles), so a small size is where it weighs most."""
    params = {**MEASURED, "size": 256}
    masked = measure(weights_file, params, masks=4)
    assert masked["estimated"] == pytest.approx(masked["measured"], rel=0.2)
    assert masked["estimated"] == estimate(params, masks=4) > estimate(params)


def test_checkpointing_lowers_the_measured_peak_by_the_predicted_factor(weights_file):
    params = {**MEASURED, "steps": 2, "size": 384, "min_scale": 384}  # the peak is the first iteration's
    plain, checkpointed = measure(weights_file, params), measure(weights_file, params, checkpoint=True)
    predicted = checkpointed["estimated"] / plain["estimated"]
    measured = checkpointed["measured"] / plain["measured"]
    assert predicted < 0.9  # a saving worth the recomputation
    assert measured == pytest.approx(predicted, abs=0.08)


def test_checkpointing_gives_the_same_losses(extractor, content, style):
    params = parse_params({"size": 128, "steps": 6, "early_stop_tol": 0, "precision": "fp32"})[0]
    big_content = sample("tubingen.jpg", 128)
    plain = stylize(extractor, big_content, [style], params)
    checkpointed = stylize(extractor, big_content, [style], params, checkpoint=True)
    for term in ("content", "style", "total"):
        assert checkpointed.final_loss[term] == pytest.approx(plain.final_loss[term], rel=1e-5)


def test_the_model_follows_the_work():
    """In float32, whatever this CPU has: in bf16 other terms lead (the float32 targets of the reported losses)."""
    def fp32(**overrides):
        return parse_params({"size": 512, "precision": "fp32", **overrides})[0]

    job = StyleJob(torch.rand(3, 300, 400), (torch.rand(3, 300, 400),), fp32())
    plain = peak_bytes(workload([job], CPU))
    assert peak_bytes(workload([job], CPU, Passes(checkpoint=True))) < plain
    assert 1.9 * plain < peak_bytes(workload([job, job], CPU)) <= 2 * plain  # all but the libraries' share twice
    bigger = StyleJob(job.content, job.styles, fp32(size=1024))
    assert 3.5 * plain < peak_bytes(workload([bigger], CPU)) < 4.5 * plain  # four times the pixels
    avg = StyleJob(job.content, job.styles, fp32(pooling="avg"))
    assert peak_bytes(workload([avg], CPU)) < plain  # no positions of maxima to keep
    shallow = StyleJob(job.content, job.styles, fp32(content_layer="relu2_1", style_layers={"relu1_1": 1,
                                                                                            "relu2_1": 1}))
    assert peak_bytes(workload([shallow], CPU)) < 0.85 * plain  # the extractor stops at relu2_1
    # where a finer scale starts, the other candidate's pass beside the held one outweighs so few loss gradients
    one_scale = StyleJob(job.content, job.styles, replace(shallow.params, min_scale=512))
    assert peak_bytes(workload([one_scale], CPU)) < 0.8 * plain < peak_bytes(workload([shallow], CPU))
    huge_style = StyleJob(job.content, (torch.rand(3, 300, 400),), fp32(style_scale=4))
    assert peak_bytes(workload([huge_style], CPU)) > plain  # its targets outweigh the optimisation
    masked = [StyleJob(job.content, job.styles * count, job.params, (torch.ones(1, 30, 40),)) for count in (1, 4)]
    assert plain < peak_bytes(workload(masked[:1], CPU)) < peak_bytes(workload(masked[1:], CPU))  # per style
    bf16 = StyleJob(job.content, job.styles, fp32(precision="bf16"))
    assert peak_bytes(workload([bf16], CPU)) <= plain  # bf16 activations; float32 targets at most


def test_a_request_that_cannot_fit_is_refused_with_the_largest_size_that_does():
    """Not even by the smallest tiles: what is of the image's size (the image, the optimiser's history) is over."""
    job = StyleJob(torch.rand(3, 600, 800), (torch.rand(3, 600, 800),), parse_params({"size": 1024})[0])
    budget = peak_bytes(workload([job], CPU, Passes(tile=64))) // 2
    with pytest.raises(NotEnoughMemory) as refusal:
        admit(job, CPU, budget)
    assert (refusal.value.status, refusal.value.kind, refusal.value.field) == (413, "TooLarge", "size")
    largest = int(re.search(r"size at most (\d+) fits", str(refusal.value)).group(1))
    at = lambda size: StyleJob(job.content, job.styles, parse_params({"size": size})[0])  # noqa: E731
    assert fitting_mode([at(largest)], CPU, budget) is not None
    assert fitting_mode([at(largest + 1)], CPU, budget) is None


def test_a_request_that_fits_only_checkpointed_runs_checkpointed_or_is_refused_without_save_memory():
    job = StyleJob(torch.rand(3, 600, 800), (torch.rand(3, 600, 800),), parse_params({"size": 1024})[0])
    plain, checkpointed = (peak_bytes(workload([job], CPU, Passes(c))) for c in (False, True))
    budget = (plain + checkpointed) // 2
    assert admit(job, CPU, budget) == Passes(checkpoint=True) and admit(job, CPU, plain) == Passes()
    with pytest.raises(NotEnoughMemory):
        admit(job, CPU, budget, save_memory=False)


def test_a_request_that_fits_only_by_tiles_runs_localized_with_the_largest_tile_that_fits():
    def at(**params):
        return StyleJob(torch.rand(3, 600, 800), (torch.rand(3, 600, 800),), parse_params({"size": 1024, **params})[0])

    job = at()
    peak = lambda tile: peak_bytes(workload([job], CPU, Passes(tile=tile)))  # noqa: E731
    assert peak(128) < peak(256) < peak_bytes(workload([job], CPU, Passes(checkpoint=True)))  # it follows the tile
    budget = (peak(128) + peak(256)) // 2
    chosen = admit(job, CPU, budget)
    assert chosen.tile is not None and not chosen.checkpoint
    assert peak(chosen.tile) <= budget < peak(chosen.tile + 16)  # tiles are multiples of 16 px
    assert admit(at(passes="localized", tile=128), CPU, budget) == Passes(tile=128)
    assert admit(at(passes="localized"), CPU, budget) == chosen
    for refused in (at(passes="full"), at(passes="localized", tile=256)):
        with pytest.raises(NotEnoughMemory):
            admit(refused, CPU, budget)
    with pytest.raises(NotEnoughMemory):
        admit(job, CPU, budget, save_memory=False)


def test_a_request_whose_style_scale_cannot_fit_is_refused_naming_style_scale():
    """When the style images' targets are what exceeds the budget and a smaller style_scale fits at the size
    asked for, the refusal names style_scale and the largest that fits, not size. With full passes: localized
    ones take the style targets by tiles too."""
    def at(style_scale):
        return StyleJob(torch.rand(3, 300, 400), (torch.rand(3, 300, 400),),
                        parse_params({"size": 512, "precision": "fp32", "style_scale": style_scale,
                                      "passes": "full"})[0])

    budget = (peak_bytes(workload([at(1)], CPU)) + peak_bytes(workload([at(4)], CPU, Passes(checkpoint=True)))) // 2
    with pytest.raises(NotEnoughMemory) as refusal:
        admit(at(4), CPU, budget)
    assert (refusal.value.status, refusal.value.field) == (413, "style_scale")
    assert str(refusal.value).startswith("style_scale 4 with these images and settings needs about")
    largest = float(re.search(r"style_scale at most ([0-9.]+) fits at size 512", str(refusal.value)).group(1))
    assert 1 <= largest < 4
    assert fitting_mode([at(largest)], CPU, budget) is not None
    assert fitting_mode([at(round(largest + 0.01, 2))], CPU, budget) is None
