#!/usr/bin/env python3
"""Where a finer scale of coarse to fine starts, measured: the loss at the output within equal time budgets.

    .venv/bin/python benchmarks/coarse_to_fine_start.py                  # 256 and 512 px: about 5 minutes on 2 cores
    .venv/bin/python benchmarks/coarse_to_fine_start.py --sizes 64 --seconds 2 --repeats 1   # smoke test

Starts compared (style_engine/optimize.py), taking turns in each repeat, for init content and noise:
- upsampled: the coarse result resampled to the finer size;
- carried: the finer scale's own start (the content, or fresh noise) plus what the coarser scale changed;
- lower: per image whichever of the two has the lower loss at the finer size (two forward passes more).
For each: the final float32 loss at the output (median of --repeats runs; the time budget is max_seconds, the
iteration budget unbounded), and at each scale change the ratio of the finer scale's first loss to the coarser
scale's last (its losses are scaled to be comparable: targets.py, style_factor). Results go to
benchmarks/results/coarse-to-fine-start.json (--output).
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from style_engine import VGGFeatures, load_features_state_dict, optimize, parse_params, stylize  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402
from style_engine.precision import cpu_flags_have_bf16, cpu_has_native_bf16  # noqa: E402


# Each start as optimize.finer_start returns it: the image, and no pass done for its first iteration.
def upsampled(run, objective, coarse, init_full, coarse_size, size):
    return optimize.upsampled_start(coarse, size), None


def carried(run, objective, coarse, init_full, coarse_size, size):
    return optimize.carried_start(coarse, init_full, coarse_size, size), None


STARTS = {"upsampled": upsampled, "carried": carried, "lower": optimize.finer_start}


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    extractor = VGGFeatures(load_features_state_dict("random"))
    content = load_image_file(str(ROOT / "samples" / "tubingen.jpg"))
    style = load_image_file(str(ROOT / "samples" / "styles" / "starry_night.jpg"))
    report = {"date": datetime.date.today().isoformat(), "machine": _machine(), "torch": torch.__version__,
              "native_bf16": cpu_has_native_bf16(), "cpu_flags_bf16": cpu_flags_have_bf16(),
              "repeats": args.repeats, "runs": []}
    _run(extractor, content, style, args.sizes[0], 1, "content")  # warm-up: the first run pays for first use
    engine_start = optimize.finer_start
    try:
        for size, seconds in zip(args.sizes, args.seconds):
            for init in args.inits:
                rows = {name: [] for name in STARTS}
                for _ in range(args.repeats):
                    for name, start in STARTS.items():
                        optimize.finer_start = start
                        rows[name].append(_run(extractor, content, style, size, seconds, init))
                for name, runs in rows.items():
                    row = {"size": size, "seconds": seconds, "init": init, "start": name,
                           "final_loss": statistics.median(r["final_loss"] for r in runs),
                           "steps": statistics.median(r["steps"] for r in runs),
                           "jumps": [statistics.median(j) for j in zip(*(r["jumps"] for r in runs))],
                           "precision": runs[0]["precision"], "all": runs}
                    report["runs"].append(row)
                    print(f"{size:>4} px {seconds:>4g} s init={init:<7} {name:<9} final {row['final_loss']:10.1f}"
                          f"  steps {row['steps']:5g}  first/last loss at each scale change "
                          f"{', '.join(f'{j:.2f}' for j in row['jumps'])}", flush=True)
    finally:
        optimize.finer_start = engine_start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _run(extractor, content, style, size: int, seconds: float, init: str) -> dict:
    params, _ = parse_params({"size": size, "steps": 10_000, "early_stop_tol": 0, "max_seconds": seconds,
                              "init": init, "seed": 1})
    last, jumps = {}, []

    def on_progress(progress):
        if progress.scale > 1 and progress.scale not in last:
            jumps.append(progress.loss["total"] / last[progress.scale - 1])
        last[progress.scale] = progress.loss["total"]

    result = stylize(extractor, content, [style], params, callback=on_progress)
    return {"final_loss": result.final_loss["total"], "steps": result.steps, "jumps": jumps,
            "precision": result.precision}


def _machine() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return f"{model}, {torch.get_num_threads()} threads, {platform.platform()}"


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seconds", type=float, nargs="+", default=[6, 15], help="time budget at each size")
    parser.add_argument("--inits", nargs="+", default=["content", "noise"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "coarse-to-fine-start.json"))
    return parser


if __name__ == "__main__":
    sys.exit(main())
