"""Every GPU figure of the benchmarks in one run, driving the engine directly (no TorchServe, no Java there).

    bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU; see that script
    python benchmarks/gpu_check.py --device cpu --size 64 --steps 3 --batch-size 64 --max-batch 2 \
        --memory-sizes 64 --default-steps 3   # smoke test

Measures, each the median of --repeats runs: the engine at --size px for --steps iterations in float32 (strict:
no TF32) and in the fast mode (bf16 autocast, what `auto` picks on a GPU), as seconds per run, iterations per
second, effective TFLOP/s and peak memory, and whether the fast mode's final loss is within 1 % of float32's; a
default request at --size px; images per second for batches of 1, 2, 4, 8 at --batch-size px; and the memory
model's estimate against the measured peak at --memory-sizes px (full passes, up to 4096 px); at
--localized-sizes px (up to 8192, the largest size a GPU serves) how the memory model runs a request within the
worker's budget and by tiles, each estimated against the measured peak, with the seconds per iteration; and at
--overhead-size px an iteration by the fewest tiles against a full one, taking turns.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from style_engine import StyleJob, VGGFeatures, load_features_state_dict, parse_params, stylize_batch  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402
from style_engine.localized import alignment  # noqa: E402
from style_engine.memory import Passes, fitting_mode, free_bytes, peak_bytes, workload  # noqa: E402
from server_config import ServerConfig  # noqa: E402

MACS_PER_PIXEL = 3.6e5  # VGG19 up to relu5_1, forward; the backward pass to the image costs about as much


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    device = torch.device(args.device)
    extractor = VGGFeatures(load_features_state_dict(args.weights)).to(device)
    content = load_image_file(str(ROOT / "samples" / "tubingen.jpg"))
    style = load_image_file(str(ROOT / "samples" / "styles" / "starry_night.jpg"))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "size": args.size, "steps": args.steps}
    fixed = {"size": args.size, "steps": args.steps, "min_scale": args.size, "early_stop_tol": 0}
    for mode, precision in (("fp32", "fp32"), ("fast", "bf16")):
        report[mode] = measure(extractor, [(content, style)], {**fixed, "precision": precision}, args.repeats)
    report["fast_loss_vs_fp32"] = report["fast"]["final_loss"] / report["fp32"]["final_loss"] - 1
    default = {"size": args.size, **({"steps": args.default_steps} if args.default_steps else {})}
    report["default_request"] = measure(extractor, [(content, style)], default, args.repeats)
    report["batching"] = {batch: measure(extractor, [(content, style)] * batch,
                                         {"size": args.batch_size, "steps": args.steps, "early_stop_tol": 0},
                                         args.repeats)
                          for batch in (1, 2, 4, 8) if batch <= args.max_batch}
    report["memory_model"] = {size: memory_check(extractor, content, style, size) for size in args.memory_sizes}
    budget = args.memory_budget or worker_budget(device)
    report["localized"] = {size: localized_check(extractor, content, style, size, budget)
                           for size in args.localized_sizes}
    report["localized_overhead"] = overhead_check(extractor, content, style, args.overhead_size, args.repeats)
    report["fp32_tf32_flags"] = tf32_check(extractor, content, style, args.size)
    show(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256, help="image size of the batching sweep, px")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[512, 1024, 2048, 4096],
                        help="sizes at which memory.py's estimate is checked against the measured peak")
    parser.add_argument("--localized-sizes", type=int, nargs="*", default=[2048, 8192],
                        help="sizes run as the memory model runs them within the worker's budget, and by tiles")
    parser.add_argument("--overhead-size", type=int, default=2048,
                        help="size at which an iteration by tiles is timed against a full one")
    parser.add_argument("--memory-budget", type=int,
                        help="bytes for a request (default: the worker's, model-config.yaml's rule on this device)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--default-steps", type=int, help="cut the default request to this many iterations (smoke "
                                                          "tests); its own default otherwise")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help="write the figures as JSON here")
    return parser


def measure(extractor, pairs, raw_params: dict, repeats: int) -> dict:
    """Median wall time of stylize_batch over `pairs` (content, style), with its throughput and peak memory."""
    device = extractor.mean.device
    params, _ = parse_params(raw_params)
    jobs = [StyleJob(content, (style,), params) for content, style in pairs]
    stylize_batch(extractor, jobs)  # warm-up: cuDNN picks its algorithms, the allocator fills its pools
    times, results = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        reports = []  # (iterations done, pixels of the scale) at each progress report of the first image

        def on_progress(progress, reports=reports):
            if progress.item == 0:
                reports.append((progress.step, progress.size[0] * progress.size[1]))

        _synchronize(device)
        start = time.perf_counter()
        results = stylize_batch(extractor, jobs, callback=on_progress)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    iterations = results[0].steps
    flops = 2 * 2 * MACS_PER_PIXEL * _pixel_iterations(reports) * len(jobs)  # 2 FLOP per MAC; fwd + bwd
    return {"seconds": seconds, "iterations": iterations, "iterations_per_second": iterations / seconds,
            "images_per_second": len(jobs) / seconds, "effective_tflops": flops / seconds / 1e12,
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "final_loss": results[0].final_loss["total"], "stop_reason": results[0].stop_reason}


def tf32_check(extractor, content, style, size: int) -> dict:
    """The TF32 flags (cuDNN, cuBLAS) as a float32 request's convolutions saw them in its forward passes and in
    its backward passes (checkpointed, so the recompute is among them), the host having turned TF32 on:
    each must be [[false, false]] (precision.strict_float32)."""
    seen = {"forward": set(), "backward": set()}

    def flags():
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    def on_forward(module, inputs, output):
        seen["forward"].add(flags())
        if output.requires_grad:
            output.register_hook(lambda grad: seen["backward"].add(flags()))

    hooks = [m.register_forward_hook(on_forward) for m in extractor.modules() if isinstance(m, torch.nn.Conv2d)]
    before = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        params, _ = parse_params({"size": size, "steps": 2, "min_scale": size, "precision": "fp32"})
        stylize_batch(extractor, [StyleJob(content, (style,), params)], checkpoint=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        for hook in hooks:
            hook.remove()
    return {part: sorted(states) for part, states in seen.items()}


def memory_check(extractor, content, style, size: int) -> dict:
    """Peak memory of two iterations at `size` (one scale, full passes) in float32 and the fast mode:
    style_engine/memory.py's estimate and, on a GPU, the measured peak allocated beyond what was allocated before
    (MiB)."""
    rows = {}
    for precision in ("fp32", "bf16"):
        params, _ = parse_params({"size": size, "steps": 2, "min_scale": size, "early_stop_tol": 0,
                                  "precision": precision})
        rows[precision] = run_measured(extractor, StyleJob(content, (style,), params), Passes())
    return rows


def worker_budget(device: torch.device) -> int:
    """The memory a worker on `device` gives a request: its free memory less the archive's memory_margin."""
    config = ServerConfig.from_model_yaml(yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text()),
                                          device.type)
    return config.memory_budget_bytes or int(free_bytes(device) * (1 - config.memory_margin))


def localized_check(extractor, content, style, size: int, budget: int) -> dict:
    """Two iterations at `size` (one scale) in float32 and the fast mode, run as memory.py runs them within
    `budget` bytes (`auto`) and by tiles (`localized`, the largest tile that fits): the passes chosen, the
    estimate, the measured peak on a GPU (MiB) and the seconds per iteration; None where it does not fit."""
    rows = {}
    for precision in ("fp32", "bf16"):
        for passes in ("auto", "localized"):
            params, _ = parse_params({"size": size, "steps": 2, "min_scale": size, "early_stop_tol": 0,
                                      "precision": precision, "passes": passes})
            job = StyleJob(content, (style,), params)
            mode = fitting_mode([job], extractor.mean.device, budget)
            rows[f"{precision}_{passes}"] = None if mode is None else run_measured(extractor, job, mode)
    return rows


def run_measured(extractor, job: StyleJob, passes: Passes) -> dict:
    """One run of `job` with `passes`: memory.py's estimate, the measured peak (GPU) and seconds per iteration."""
    device = extractor.mean.device
    measured = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    result, = stylize_batch(extractor, [job], checkpoint=passes.checkpoint, tile=passes.tile)
    _synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        measured = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {"checkpoint": passes.checkpoint, "tile": passes.tile, "seconds_per_iteration": seconds / result.steps,
            "estimated_mib": peak_bytes(workload([job], device, passes)) / 2**20, "measured_mib": measured}


def overhead_check(extractor, content, style, size: int, repeats: int) -> dict:
    """Seconds of an iteration at `size` (one scale, float32) in full passes and by the fewest tiles (two, each
    half the longer side: the least overhead localized passes have), taking turns; medians and their ratio."""
    params, _ = parse_params({"size": size, "steps": 2, "min_scale": size, "early_stop_tol": 0, "precision": "fp32"})
    job = StyleJob(content, (style,), params)
    fewest = Passes(tile=size - alignment([params.content_layer, *dict(params.style_layers)]))
    times = {"full": [], "localized": []}
    for _ in range(repeats):
        for name, passes in (("full", Passes()), ("localized", fewest)):
            times[name].append(run_measured(extractor, job, passes)["seconds_per_iteration"])
    full, localized = statistics.median(times["full"]), statistics.median(times["localized"])
    return {"size": size, "tile": fewest.tile, "full_seconds": full, "localized_seconds": localized,
            "ratio": localized / full}


def _pixel_iterations(reports: list[tuple[int, int]]) -> int:
    """Pixels times iterations over all scales. On a GPU the engine reports every few iterations, but always
    at the last one of a scale, so each report's iterations ran at its own scale's size."""
    done, total = 0, 0
    for step, pixels in reports:
        total += (step - done) * pixels
        done = step
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def show(report: dict) -> None:
    print(f"{report['device']}, torch {report['torch']}, {report['date']}")
    for name in ("fp32", "fast", "default_request"):
        row = report[name]
        print(f"{name:>16}: {row['seconds']:.3f} s for {row['iterations']} it at {report['size']} px, "
              f"{row['iterations_per_second']:.0f} it/s, {row['effective_tflops']:.1f} TFLOP/s, "
              f"peak {row['peak_memory_mib'] or 0:.0f} MiB")
    print(f"fast mode's final loss vs fp32: {100 * report['fast_loss_vs_fp32']:+.2f} %")
    for batch, row in report["batching"].items():
        print(f"batch of {batch}: {row['images_per_second']:.2f} images/s, {row['effective_tflops']:.1f} TFLOP/s, "
              f"peak {row['peak_memory_mib'] or 0:.0f} MiB")
    for size, rows in report["memory_model"].items():
        for precision, row in rows.items():
            print(f"memory at {size} px {precision}: estimated {row['estimated_mib']:.0f} MiB, "
                  f"measured {row['measured_mib'] or 0:.0f} MiB")
    for size, rows in report["localized"].items():
        for name, row in rows.items():
            print(f"at {size} px {name}: " + ("does not fit" if row is None else
                  f"checkpoint {row['checkpoint']}, tile {row['tile']}, {row['seconds_per_iteration']:.3f} s/it, "
                  f"estimated {row['estimated_mib']:.0f} MiB, measured {row['measured_mib'] or 0:.0f} MiB"))
    overhead = report["localized_overhead"]
    print(f"an iteration by {overhead['tile']} px tiles at {overhead['size']} px: {overhead['ratio']:.2f}x a full one")
    print(f"fp32's TF32 flags (cuDNN, cuBLAS), should be [[False, False]]: {report['fp32_tf32_flags']}")


if __name__ == "__main__":
    sys.exit(main())
