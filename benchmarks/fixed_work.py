#!/usr/bin/env python3
"""Fixed work per request: what a request waits for that is not its optimisation's iterations, in iterations at
the output scale, per size, schedule and precision; where it goes, stage by stage; and the time model's
estimates (style_engine/cost.py) beside what was measured.

    .venv/bin/python benchmarks/fixed_work.py                                  # 128, 512 and 1024 px, float32
    STYLE_FORCE_PRECISION=bf16 .venv/bin/python benchmarks/fixed_work.py --sizes 128 --precisions bf16
    .venv/bin/python benchmarks/fixed_work.py --cpu-time --sizes 128 512         # on a shared host
    .venv/bin/python benchmarks/fixed_work.py --sizes 64 --repeats 1 --output /tmp/fixed.json   # smoke test
    python3 benchmarks/fixed_work.py --device cuda --precisions fp32 bf16 --iterations-per-scale 21  # a GPU

A request as a server serves it: the sample content and style files decoded and reduced to what the
optimisation uses, optimised (stylize_batch, with a Gram cache of its own: the style is new to it), the result
encoded as PNG. It runs --iterations-per-scale iterations at every scale, with no early stop and no time budget,
one scale (min_scale = size) or coarse to fine from 128 px (the default schedule; half the size below 256 px).
An iteration's time at a scale is the median over the gaps between its progress reports of each gap's time per
iteration (a CPU reports every iteration; a GPU every GPU_SYNC_EVERY and at a scale's last, so give it more
iterations per scale there); the fixed work is the request's seconds less its iterations: the time between
each scale's first and last report, as it was, and before the first report that time per iteration (the
start of the scale's first iteration is not reported: the scale's own fixed work comes before it). The
cases take turns in each round, the medians of --repeats rounds are reported, and one more run of each under
torch.profiler gives its stages (style_engine/stages.py, plus decoding, resizing and encoding; in wall-clock
seconds). The time model's speed is measured as a worker measures it, at the start. Results go to
benchmarks/results/fixed-work.json (fixed-work-cpu-time.json with --cpu-time; --output) with the machine named:
which CPU, its flags, the precision that ran, the GPU where it ran on one.

--cpu-time runs on one thread and times everything by that thread's CPU time: what the work itself takes,
whatever else runs on the host (tests/test_fixed_work.py measures so), rather than what a worker, on all the
cores, takes.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "benchmarks")]

from style_engine import StyleJob, VGGFeatures, load_features_state_dict, parse_params, stylize_batch  # noqa: E402
from style_engine.codec import decode_image, encode_image  # noqa: E402
from style_engine.cost import group_cost, measure_speed  # noqa: E402
from style_engine.optimize import scale_sizes  # noqa: E402
from style_engine.precision import cpu_flags_have_bf16, cpu_has_native_bf16  # noqa: E402
from style_engine.stages import FIXED, ITERATION, mark  # noqa: E402
from style_engine.targets import GramCache, output_size, shrink_to_need  # noqa: E402

ITERATIONS_PER_SCALE = 3  # on a CPU, two gaps between progress reports at each scale: its iteration time
CONTENT, STYLE = ROOT / "samples" / "tubingen.jpg", ROOT / "samples" / "styles" / "starry_night.jpg"
PARTS = ("content", "style")
MAX_PIXELS = 40_000_000
DECODE, RESIZE, ENCODE = "decode", "resize", "encode"  # the handler's stages, outside the engine
SCHEDULES = ("one_scale", "coarse_to_fine")


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    device = torch.device(args.device)
    extractor = VGGFeatures(load_features_state_dict("random")).to(device)
    files = CONTENT.read_bytes(), STYLE.read_bytes()
    per_scale = {"iterations_per_scale": args.iterations_per_scale}
    cases = [(size, schedule, precision) for size in args.sizes for schedule in SCHEDULES
             for precision in args.precisions]
    speed = measure_speed(extractor, device, clock=clock)
    report = {"machine": machine(device), "clock": "thread CPU time, one thread" if args.cpu_time else "wall clock",
              "repeats": args.repeats, **per_scale, "speed": speed.describe(), "cases": []}
    request(extractor, files, min(args.sizes), "coarse_to_fine", args.precisions[0], clock, **per_scale)  # warm-up
    runs = defaultdict(list)
    for round_ in range(args.repeats):
        for case in cases:
            runs[case].append(request(extractor, files, *case, clock=clock, **per_scale))
            log(f"round {round_ + 1}: {describe(case)}: {summary(runs[case][-1])}")
    for case in cases:
        profiled = request(extractor, files, *case, clock=clock, profile=True, **per_scale)
        row = {"size": case[0], "schedule": case[1], "precision": runs[case][0]["precision"],
               **medians(runs[case]), "stages": profiled["stages"],
               "model": model_estimate(extractor, files, *case, speed, **per_scale)}
        row["model"]["fixed_over_measured"] = row["model"]["fixed_seconds"] / row["engine_fixed_seconds"]
        row["model"]["iteration_over_measured"] = row["model"]["iteration_seconds"] / row["iteration_seconds"]
        report["cases"].append(row)
        model = row["model"]
        log(f"{describe(case)}: fixed work {row['fixed_iterations']:.2f} iterations ({row['fixed_seconds']:.2f} s, "
            f"one iteration {row['iteration_seconds']:.3f} s); model: fixed x{model['fixed_over_measured']:.2f}, "
            f"iteration x{model['iteration_over_measured']:.2f}")
    name = "fixed-work-cpu-time.json" if args.cpu_time else "fixed-work.json"
    output = Path(args.output or ROOT / "benchmarks" / "results" / name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {output}")
    return 0


def request(extractor, files: tuple[bytes, bytes], size: int, schedule: str, precision: str,
            clock=time.perf_counter, profile: bool = False, iterations_per_scale: int = ITERATIONS_PER_SCALE) -> dict:
    """One request, from its files to its encoded answer, timed by `clock`: its seconds, its fixed work, its
    iteration time at the output scale (seconds and in iterations), and with `profile` the seconds of each
    stage."""
    stamps: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)  # by scale: (iterations, when)

    def on_progress(progress):
        stamps[progress.size].append((progress.step, clock()))

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    with profiler or contextlib.nullcontext():
        start = clock()
        with mark(DECODE):
            content, style = decode(files)
            decoded = clock()
        with mark(RESIZE):
            job = shrink_to_need(the_job(content, style, size, schedule, precision, iterations_per_scale))
            prepared = clock()
        (result,) = stylize_batch(extractor, [job], callback=on_progress, gram_cache=GramCache())
        with mark(ENCODE):
            encode_image(result.image, "png")
        seconds = clock() - start
    iteration, iterating = iteration_times(stamps)
    output = max(iteration, key=lambda scale: scale[0] * scale[1])
    fixed = seconds - sum(iterating.values())
    measured = {"seconds": seconds, "decode_seconds": decoded - start, "resize_seconds": prepared - decoded,
                "fixed_seconds": fixed, "engine_fixed_seconds": fixed - (prepared - start),
                "iteration_seconds": iteration[output],
                "fixed_iterations": fixed / iteration[output], "steps": result.steps, "precision": result.precision,
                "scales": [f"{width}x{height}" for height, width in stamps]}
    if profiler is not None:
        measured["stages"] = stages(profiler)
    return measured


def iteration_times(stamps: dict) -> tuple[dict, dict]:
    """From the progress reports {scale: [(iterations done, when)]}, in the order they came: each scale's time
    per iteration (the median over the gaps between its reports), and the seconds its iterations took: between
    its first and last report as timed, and before the first at that time per iteration.
    Timed gaps rather than a median times the iterations: the fixed work is what is left of the request's
    time, a small difference, which a median a few percent off would move by as many iterations."""
    iteration, iterating, done = {}, {}, 0
    for scale, reports in stamps.items():
        (first_step, first_when), (last_step, last_when) = reports[0], reports[-1]
        iteration[scale] = statistics.median((when - before) / (step - earlier)
                                             for (earlier, before), (step, when) in zip(reports, reports[1:]))
        iterating[scale] = last_when - first_when + (first_step - done) * iteration[scale]
        done = last_step
    return iteration, iterating


def decode(files: tuple[bytes, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(decode_image(data, part, max_pixels=MAX_PIXELS) for data, part in zip(files, PARTS))


def the_job(content: torch.Tensor, style: torch.Tensor, size: int, schedule: str, precision: str,
            iterations_per_scale: int = ITERATIONS_PER_SCALE) -> StyleJob:
    """The request: one scale, or coarse to fine from 128 px (the default; from half the size below 256 px), with
    `iterations_per_scale` iterations at every scale."""
    min_scale = size if schedule == "one_scale" else 128 if size >= 256 else size // 2
    job = StyleJob(content, (style,), parse_params({"size": size, "min_scale": min_scale, "early_stop_tol": 0,
                                                    "precision": precision, "max_seconds": None})[0])
    scales = len(scale_sizes([job], output_size(job)))
    return StyleJob(content, (style,), replace(job.params, steps=iterations_per_scale * scales))


def stages(profiler) -> dict[str, float]:
    """Seconds per stage mark ("<stage> <width>x<height>"), summed, the iterations too."""
    names = {*FIXED, ITERATION, DECODE, RESIZE, ENCODE}
    seconds: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.name.split(" ", 1)[0] in names:
            seconds[event.name] += event.time_range.elapsed_us() / 1e6
    return dict(sorted(seconds.items()))


def model_estimate(extractor, files, size: int, schedule: str, precision: str, speed,
                   iterations_per_scale: int = ITERATIONS_PER_SCALE) -> dict:
    """The time model's fixed work (after decoding and resizing) and iteration at the output scale for this
    request."""
    job = shrink_to_need(the_job(*decode(files), size, schedule, precision, iterations_per_scale))
    cost = group_cost([job], extractor.mean.device, speed)
    return {"fixed_seconds": cost.fixed, "iteration_seconds": cost.iteration}


def medians(runs: list[dict]) -> dict:
    keys = ("seconds", "decode_seconds", "resize_seconds", "fixed_seconds", "engine_fixed_seconds",
            "iteration_seconds", "fixed_iterations")
    return {**{key: statistics.median(run[key] for run in runs) for key in keys},
            "fixed_iterations_all": [run["fixed_iterations"] for run in runs], "steps": runs[0]["steps"],
            "scales": runs[0]["scales"]}


def machine(device: torch.device = torch.device("cpu")) -> dict:
    """The CPU by name and by the flags the engine reads, and what it runs bf16 as; the GPU where it runs."""
    with open("/proc/cpuinfo") as cpuinfo:
        lines = cpuinfo.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "flags": sorted(flag for flag in flags if flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")),
            "native_bf16_flags": cpu_flags_have_bf16(), "bf16_runs_as_native": cpu_has_native_bf16(),
            "date": time.strftime("%Y-%m-%d"),
            **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}


def describe(case: tuple) -> str:
    size, schedule, precision = case
    return f"{size} px {schedule} {precision}"


def summary(run: dict) -> str:
    return (f"{run['seconds']:.2f} s, fixed {run['fixed_seconds']:.2f} s = {run['fixed_iterations']:.2f} iterations "
            f"of {run['iteration_seconds']:.3f} s ({run['precision']})")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "auto"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    parser.add_argument("--device", default="cpu", help="where the engine runs: cpu or cuda")
    parser.add_argument("--iterations-per-scale", type=int, default=ITERATIONS_PER_SCALE,
                        help="at least two progress reports a scale: GPU_SYNC_EVERY + 1 or more on a GPU")
    parser.add_argument("--output", help="default: benchmarks/results/fixed-work.json, or -cpu-time.json")
    return parser


if __name__ == "__main__":
    sys.exit(main())
