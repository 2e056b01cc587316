#!/usr/bin/env python3
"""Localized passes against full ones, side by side: the time and the peak memory of one iteration's pass.

    .venv/bin/python benchmarks/localized.py                      # 512, 1024, 2048 px: about 12 minutes on 2 cores
    .venv/bin/python benchmarks/localized.py --sizes 64 --repeats 1 --output /tmp/l.json   # smoke test

At each size (longer side; tubingen's 4:3 shape, a default request in float32, random weights), the loss and
its gradient with respect to the image (an iteration's pass: the optimiser's step is the same either way), over
the whole image and by tiles (style_engine/localized.py), taking turns in each repeat: seconds (median of
--repeats, per size), then, in a run of each that is not timed, the peak of glibc's bytes in use during the pass
(after the timed runs have paid for first-use allocations), beside memory.py's estimate of the pass
(`pass_estimate_mib`: an iteration's step, without what lives through a request). The peak is sampled apart
from the timing: the sampler takes malloc's lock every half millisecond, which slowed the pass that allocates
more often (by tiles: 10.1 s against 7.1 s unsampled at 1024 px). Two layouts of tiles at each size: the
fewest that split the image (two, across the longer side: the least overhead a localized pass has) and two
each way (half the longer side); --tiles sets one tile side per size instead. Results go to
benchmarks/results/localized.json (--output) with the machine named.
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from fixed_work import log, machine  # noqa: E402
from probe import _in_use, _sampling  # noqa: E402
from style_engine import StyleJob, VGGFeatures, load_features_state_dict, parse_params  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402
from style_engine.localized import LocalizedPass, alignment, tiles  # noqa: E402
from style_engine.memory import Passes, _step, workload  # noqa: E402
from style_engine.targets import build_objective, output_size, shrink_to_need  # noqa: E402


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    extractor = VGGFeatures(load_features_state_dict("random"))
    content = load_image_file(str(ROOT / "samples" / "tubingen.jpg"))
    style = load_image_file(str(ROOT / "samples" / "styles" / "starry_night.jpg"))
    report = {"machine": machine(), "repeats": args.repeats, "sizes": {}}
    for index, size in enumerate(args.sizes):
        tile = args.tiles[index] if args.tiles else None
        repeats = args.repeats[min(index, len(args.repeats) - 1)]
        report["sizes"][str(size)] = compare(extractor, content, style, size, tile, repeats)
        log(f"{size} px: {summary(report['sizes'][str(size)])}")
        args.output.write_text(json.dumps(report, indent=1) + "\n")  # what is done so far, should a size not end
    return 0


def compare(extractor, content, style, size: int, tile: int | None, repeats: int) -> dict:
    """The full pass and the localized one by tiles of `tile` px, or else in both layouts, at `size`, taking
    turns: medians, peaks and the localized passes' ratios to the full one."""
    job = shrink_to_need(StyleJob(content, (style,), parse_params({"size": size, "precision": "fp32"})[0]))
    shape = output_size(job)
    step = alignment(_layers(job))  # tiles start at its multiples: two across, or two each way
    sides = [tile] if tile else [size - step, max(step, (size // 2) // step * step)]
    objective = build_objective(extractor, [job], shape, shape, bf16=False)  # the same targets either way
    passes = {None: _full_pass(extractor, job, objective),
              **{side: _localized_pass(extractor, job, objective, side) for side in sides}}
    runs = {side: [] for side in passes}
    for _ in range(repeats):
        for side, work in passes.items():
            runs[side].append(_timed(work))
    peaks = {side: _peak(work) for side, work in passes.items()}
    measured = {side: _figures(job, shape, side, runs[side], peaks[side]) for side in passes}
    full = measured.pop(None)
    return {"shape": list(shape), "repeats": repeats, "full": full,
            "localized": [{**row, "time_ratio": row["seconds"] / full["seconds"],
                           "peak_ratio": row["peak_mib"] / full["peak_mib"]} for row in measured.values()]}


def _figures(job: StyleJob, shape: tuple[int, int], tile: int | None, seconds: list[float], peak: int) -> dict:
    """The median time, the peak and memory.py's estimate of the pass by tiles of `tile` (None: full)."""
    work = workload([job], torch.device("cpu"), Passes(tile=tile))
    layout = {}
    if tile is not None:
        parts = tiles(shape, tile, _layers(job))
        layout = {"tile": tile, "tiles": len(parts),
                  "tile_runs_px": sum((p.run[1] - p.run[0]) * (p.run[3] - p.run[2]) for p in parts)}
    return {**layout, "seconds": statistics.median(seconds), "seconds_all": seconds, "peak_mib": peak / 2**20,
            "pass_estimate_mib": (_step(work) + 4 * 3 * shape[0] * shape[1]) / 2**20}


def _layers(job: StyleJob) -> list[str]:
    return [job.params.content_layer, *dict(job.params.style_layers)]


def _full_pass(extractor, job: StyleJob, objective):
    x = job.content.unsqueeze(0).clone()

    def work():
        image = x.clone().requires_grad_(True)
        objective(extractor(image, objective.layers, job.params.pooling), image).total.sum().backward()

    return work


def _localized_pass(extractor, job: StyleJob, objective, tile: int):
    localized = LocalizedPass(objective, functools.partial(extractor, pooling=job.params.pooling), tile)
    x = job.content.unsqueeze(0).clone()
    return lambda: localized.evaluate(x.clone().requires_grad_(True), grad=True)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _peak(work) -> int:
    """The most bytes glibc had handed out at once during a run of `work`, beyond those before it."""
    before = _in_use()
    with _sampling(_in_use) as peak:
        work()
    return peak() - before


def summary(result: dict) -> str:
    full = result["full"]
    return f"full {full['seconds']:.2f} s {full['peak_mib']:.0f} MiB; " + "; ".join(
        f"{row['tiles']} tiles of {row['tile']} px {row['seconds']:.2f} s {row['peak_mib']:.0f} MiB: "
        f"time x{row['time_ratio']:.2f}, peak x{row['peak_ratio']:.2f}" for row in result["localized"])


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--tiles", type=int, nargs="+",
                        help="one tile side at each size (default: two layouts, see above)")
    parser.add_argument("--repeats", type=int, nargs="+", default=[9, 7, 1],
                        help="runs of each at each size (the last value for the sizes past the list)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "localized.json")
    return parser


if __name__ == "__main__":
    sys.exit(main())
