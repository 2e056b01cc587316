"""The time model (style_engine/cost.py) against the engine's real work, and the handler's use of it: groups
whose fixed work no longer fits the call's time get 503 with Retry-After, a request whose fixed work could not
fit the server's maximum even alone gets 413 naming the largest size that fits. Times are in the device's
measured speed, so that they hold on a slow CPU as here."""

import json
import time
from dataclasses import replace

import pytest
import torch

from conftest import SAMPLES, STYLES, sample
from handler_context import make_context, model_dir_with_weights, start_batch
from style_engine import StyleJob, parse_params, stylize_batch
from style_engine.cost import DeviceSpeed, group_cost, measure_speed
from style_engine.targets import shrink_to_need
from style_transfer_handler import StyleTransferHandler

CPU = torch.device("cpu")
CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()


@pytest.fixture(scope="module")
def speed(extractor):
    return measure_speed(extractor, CPU)


def slowed(speed: DeviceSpeed, factor: float) -> DeviceSpeed:
    """The same device `factor` times slower."""
    return DeviceSpeed({k: v * factor for k, v in speed.forward.items()},
                       {k: v * factor for k, v in speed.iteration.items()}, speed.encode * factor)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_batch_whose_deadline_has_passed_does_only_its_fixed_work_within_the_estimate(extractor, precision):
    """Past its deadline a batch still computes its targets at every scale, evaluates each scale's start image
    and reports float32 losses: the work the model calls fixed. It must not take longer than estimated (the
    handler reserves that much), nor be so overestimated that the estimate refuses what would fit."""
    # style images three times the output's size: their targets at each scale are most of the fixed work
    params = parse_params({"size": 128, "min_scale": 32, "steps": 50, "style_scale": 3, "precision": precision})[0]
    styles = (sample("styles/starry_night.jpg"), sample("styles/shipwreck.jpg"))
    job = shrink_to_need(StyleJob(sample("tubingen.jpg"), styles, params))
    jobs = [job, replace(job, params=replace(params, seed=1))]
    stylize_batch(extractor, jobs, deadline=time.perf_counter())  # warm-up: first calls allocate
    # timed just before the work, as a worker times its device just before serving: on a shared machine the
    # speed of a minute ago may not be the speed now
    fixed = group_cost(jobs, CPU, measure_speed(extractor, CPU)).fixed
    started = time.perf_counter()
    results = stylize_batch(extractor, jobs, deadline=started)
    elapsed = time.perf_counter() - started
    assert all(result.steps == 0 and result.stop_reason == "max_seconds" for result in results)
    assert elapsed <= fixed, f"fixed work took {elapsed:.3f} s, estimated {fixed:.3f} s"
    assert fixed <= 6 * elapsed, f"fixed work took {elapsed:.3f} s, estimated {fixed:.3f} s: far too much"


def test_the_estimate_grows_with_what_the_fixed_work_depends_on(speed):
    params = parse_params({"size": 256})[0]
    job = StyleJob(sample("tubingen.jpg"), (sample("styles/starry_night.jpg"),), params)
    base = group_cost([job], CPU, speed)
    larger_styles = group_cost([replace(job, params=replace(params, style_scale=2.0))], CPU, speed)
    more_styles = group_cost([replace(job, styles=job.styles * 3)], CPU, speed)
    larger = group_cost([replace(job, params=replace(params, size=512))], CPU, speed)
    assert base.fixed < larger_styles.fixed and base.fixed < more_styles.fixed and base.fixed < larger.fixed
    more_steps = group_cost([replace(job, params=replace(params, steps=400))], CPU, speed)
    assert more_steps.fixed == base.fixed and more_steps.iterations == pytest.approx(2 * base.iterations)


@pytest.fixture(scope="module")
def handler_and_context(tmp_path_factory, random_state_dict):
    context = make_context(model_dir_with_weights(tmp_path_factory.mktemp("model"), random_state_dict),
                           {"weights": "random"})
    handler = StyleTransferHandler()
    handler.initialize(context)
    return handler, context


def request(size: int) -> dict:
    return {"content": CONTENT, "style": STYLE, "params": {"size": size, "steps": 2, "precision": "fp32"}}


def fixed_of(handler, size: int) -> float:
    job, _ = handler.preparation.prepare(request(size), grpc=False)
    return group_cost([job], CPU, handler.preparation.speed).fixed


def test_groups_whose_fixed_work_no_longer_fits_the_call_get_503_with_retry_after(handler_and_context, monkeypatch):
    handler, context = handler_and_context
    call = handler.config.seconds_per_call
    # a device so slow that the largest request's fixed work takes 60 % of the call; the two others then fit
    # beside each other, not all three
    preparation = handler.preparation
    monkeypatch.setattr(preparation, "speed", slowed(preparation.speed, 0.6 * call / fixed_of(handler, 96)))
    fixed = {size: fixed_of(handler, size) for size in (64, 80, 96)}
    assert fixed[64] + fixed[80] <= call < sum(fixed.values()) and fixed[96] <= handler.preparation.time_cap
    start_batch(context, 3)
    answers = handler.handle([request(96), request(64), request(80)], context)
    assert [context.get_response_status(i)[0] or 200 for i in range(3)] == [503, 200, 200]
    error = json.loads(answers[0])
    assert (error["code"], error["type"], error["field"]) == (503, "Busy", None)
    retry_after = int(context.get_response_headers(0)["Retry-After"])
    assert 1 <= retry_after <= call + 1 and f"in {retry_after} s" in error["message"]


def test_a_request_whose_fixed_work_exceeds_the_maximum_alone_is_refused_naming_the_size_that_fits(
        handler_and_context, monkeypatch):
    handler, context = handler_and_context
    cap = handler.preparation.time_cap
    job, _ = handler.preparation.prepare(request(96), grpc=False)
    preparation = handler.preparation
    monkeypatch.setattr(preparation, "speed", slowed(preparation.speed, 2 * cap / fixed_of(handler, 96)))
    start_batch(context, 1)
    (answer,) = handler.handle([request(96)], context)
    assert context.get_response_status(0)[0] == 413
    error = json.loads(answer)
    assert (error["type"], error["field"]) == ("TooLarge", "size")
    largest = int(error["message"].rsplit("size at most ", 1)[1].split()[0])

    def fixed_at(size):
        return group_cost([replace(job, params=replace(job.params, size=size))], CPU, handler.preparation.speed).fixed

    assert fixed_at(largest) <= cap < fixed_at(largest + 1)
