#!/usr/bin/env python3
"""Our engine against the seed's loop, side by side in one process, on the same weights, images and objective.

    .venv/bin/python benchmarks/run.py --quick --json   # 64 px, 300 seed steps: a few minutes on 2 cores
    .venv/bin/python benchmarks/run.py --json           # 128 px, 2000 seed steps: about 25 minutes on 2 cores

Sections (docs/benchmarks.md): time to the seed's result; per-iteration cost at 128 and 256 px; the loss
coarse to fine reaches within time budgets and in a default request, against other schedules; the loss a
default request reaches in bf16 against float32 (where bf16 is native); TorchServe's overhead on one request at
128 px; throughput of 1, 2, 4 and 8 concurrent requests through TorchServe's dynamic batching; peak memory of one
request at 256, 512 and 1024 px, measured against the memory model's estimate, plain and checkpointed; what
checkpointing costs per iteration; a default request at 1024 px. Times are medians of --repeats runs, the
compared runs taking turns. Results go to benchmarks/results/<mode>.json with a loss-against-time plot beside
it; --json also prints them to stdout.
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from seed_baseline import run_seed, seed_vgg  # noqa: E402
from style_engine import VGGFeatures, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.codec import decode_image, encode_image, load_image_file  # noqa: E402
from style_engine.precision import cpu_has_native_bf16, has_native_bf16  # noqa: E402
from style_engine.resize import fit_longer_side, resize  # noqa: E402

MODES = {
    # seed_size/seed_steps: the seed's run whose final loss our engine must reach (the yardsticks)
    # budgets: time budgets of the coarse-to-fine comparison at 256 px, in iterations at that size, so that
    # they mean the same on a fast machine and a slow one
    # large_size: the default request at a large size, with the server's default time budget
    "quick": {"seed_size": 64, "seed_steps": 300, "server_steps": 60, "budgets": (10, 20), "large_size": 512},
    "full": {"seed_size": 128, "seed_steps": 2000, "server_steps": None, "budgets": (10, 20, 40, 80),
             "large_size": 1024},
    # smoke: only checks that everything runs, with default requests cut to `request_steps` iterations
    "smoke": {"seed_size": 48, "seed_steps": 10, "server_steps": 5, "budgets": (3,), "request_steps": 4,
              "large_size": 64},
}
CONTENT, STYLE = ROOT / "samples" / "tubingen.jpg", ROOT / "samples" / "styles" / "starry_night.jpg"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = _arguments().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = MODES[mode]
    state_dict = load_features_state_dict(args.weights)
    extractor, seed_model = VGGFeatures(state_dict), seed_vgg(state_dict)
    report = {"mode": mode, "weights": args.weights, "repeats": args.repeats, "machine": machine()}
    report["time_to_seed_loss"] = time_to_seed_loss(extractor, seed_model, settings, args.repeats)
    report["per_iteration"] = {size: per_iteration(extractor, seed_model, size, args.repeats)
                               for size in ((48,) if args.smoke else (128, 256))}
    report["coarse_to_fine"] = coarse_to_fine(extractor, settings["budgets"], 96 if args.smoke else 256,
                                              args.repeats, settings.get("request_steps"))
    report["bf16_vs_fp32"] = precision_effect(extractor, 64 if args.smoke else 128, settings.get("request_steps"))
    with tempfile.TemporaryDirectory() as work:
        weights_file = Path(work) / "features.pth"  # for the fresh processes of probe.py
        torch.save(state_dict, weights_file)
        if not args.skip_server:
            report.update(through_torchserve(args.weights, extractor, settings, args.repeats))
        report["peak_memory"] = peak_memory(weights_file, (64,) if args.smoke else (256, 512, 1024))
    report["memory_saving"] = memory_saving(extractor, 64 if args.smoke else 512, args.repeats)
    report["large_request"] = large_request(extractor, settings["large_size"], settings.get("request_steps"))
    report["summary"] = summary(report)
    write(report, Path(args.output_dir), mode)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 px and 300 seed steps instead of 128 and 2000")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that everything runs")
    parser.add_argument("--weights", default="random", help="random (default here), imagenet or a path")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; medians are reported")
    parser.add_argument("--skip-server", action="store_true", help="leave out the TorchServe measurements")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object to stdout")
    return parser


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The content at `size` and the style resized to the content's shape, as the seed does."""
    content = load_image_file(str(CONTENT))
    content = resize(content, fit_longer_side(*content.shape[-2:], size))
    return content, resize(load_image_file(str(STYLE)), tuple(content.shape[-2:]))


# --- time to the seed's result ---------------------------------------------------------------------------------


def time_to_seed_loss(extractor, seed_model, settings: dict, repeats: int) -> dict:
    """Each round: one seed run, then our runs (cheaper, so three of each precision), interleaved so that the
    machine's slow and fast spells fall on both sides."""
    size, steps = settings["seed_size"], settings["seed_steps"]
    content, style = images(size)
    _timed_seed(seed_model, content, style, 3)  # warm-up: first calls pay for kernel selection and allocation
    for precision in ("auto", "fp32"):
        _timed_ours(extractor, content, style, size, 0.0, precision, steps=3)
    seed_runs, ours = [], {"auto": [], "fp32": []}
    for _ in range(repeats):
        seed_runs.append(_timed_seed(seed_model, content, style, steps))
        for _ in range(3):
            for precision, runs in ours.items():
                runs.append(_timed_ours(extractor, content, style, size, seed_runs[0]["loss"], precision))
    target = seed_runs[0]["loss"]
    seed_seconds = statistics.median(run["seconds"] for run in seed_runs)
    log(f"seed: {steps} Adam steps at {size} px reach {target:.6g} in {seed_seconds:.1f} s")
    result = {"size": size, "seed_steps": steps, "seed_loss": target, "seed_seconds": seed_seconds,
              "seed_curve": seed_runs[0]["curve"]}
    for precision, runs in ours.items():
        seconds = statistics.median(run["seconds"] for run in runs)
        result[precision] = {"seconds": seconds, "steps": runs[0]["steps"], "final_loss": runs[0]["loss"],
                             "reached": all(run["loss"] <= target for run in runs),
                             "speedup": seed_seconds / seconds, "curve": runs[0]["curve"]}
        log(f"ours ({precision}): {runs[0]['steps']} steps, {seconds:.2f} s, loss {runs[0]['loss']:.6g}, "
            f"speed-up {seed_seconds / seconds:.1f}x")
    return result


def _timed_seed(seed_model, content, style, steps) -> dict:
    curve, start = [], time.perf_counter()
    _, loss = run_seed(seed_model, content, style, steps,
                       on_step=lambda step, total: curve.append((time.perf_counter() - start, float(total))))
    return {"seconds": time.perf_counter() - start, "loss": loss, "curve": curve[:: max(1, steps // 200)]}


def _timed_ours(extractor, content, style, size, target, precision, steps: int | None = None) -> dict:
    """Our engine with its defaults until its float32 total loss is at or below the seed's."""
    params, _ = parse_params({"size": size, "precision": precision, **({"steps": steps} if steps else {})})
    curve = []
    result = stylize(extractor, content, [style], params, stop_below=target,
                     callback=lambda p: curve.append((p.seconds, p.loss["total"])))
    return {"seconds": result.seconds, "loss": result.final_loss["total"], "steps": result.steps, "curve": curve}


# --- cost of one iteration ---------------------------------------------------------------------------------------


def per_iteration(extractor, seed_model, size: int, repeats: int, steps: int = 8) -> dict:
    """Median seconds per iteration (forward + backward + optimiser step) of each loop at one size, the loops
    taking turns."""
    content, style = images(size)
    times = {"seed": [], "auto": [], "fp32": []}
    for _ in range(repeats):
        stamps = []
        run_seed(seed_model, content, style, steps, on_step=lambda step, total: stamps.append(time.perf_counter()))
        times["seed"] += _gaps(stamps)
        for precision in ("auto", "fp32"):
            params, _ = parse_params({"size": size, "steps": steps, "min_scale": size, "early_stop_tol": 0,
                                      "precision": precision})
            stamps = []
            stylize(extractor, content, [style], params, callback=lambda p: stamps.append(time.perf_counter()))
            times[precision] += _gaps(stamps)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["ratio"] = result["seed"] / result["auto"]
    log(f"per iteration at {size} px: seed {result['seed']:.3f} s, ours {result['auto']:.3f} s "
        f"(fp32 {result['fp32']:.3f} s): {result['ratio']:.2f}x")
    return result


def _gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step warms caches: left out


# --- bf16 against float32 -------------------------------------------------------------------------------------


def precision_effect(extractor, size: int, request_steps: int | None = None) -> dict:
    """The float32 loss a default request (cut to `request_steps` iterations, where set) reaches optimised in
    bf16 against float32, at one size: after the same iterations, and float32 given only the time the bf16 run
    took. Only where bf16 is native: elsewhere a bf16 request runs in float32 (precision.py)."""
    if not has_native_bf16(extractor.mean.device):
        log("bf16 against float32: skipped, this machine has no native bf16 (bf16 requests run in float32)")
        return {"skipped": "no native bf16 on this machine: bf16 requests run in float32"}
    content, style = images(size)
    runs, steps = {}, {} if request_steps is None else {"steps": request_steps}
    for name, raw in (("bf16", {"precision": "bf16"}), ("fp32", {"precision": "fp32"})):
        runs[name] = _default_request(extractor, content, style, {"size": size, **steps, **raw})
    runs["fp32_in_bf16_time"] = _default_request(extractor, content, style, {
        "size": size, **steps, "precision": "fp32", "max_seconds": runs["bf16"]["seconds"]})
    runs["same_steps_difference"] = runs["bf16"]["final_loss"] / runs["fp32"]["final_loss"] - 1
    runs["same_time_difference"] = runs["bf16"]["final_loss"] / runs["fp32_in_bf16_time"]["final_loss"] - 1
    log(f"default request at {size} px: bf16 reaches {runs['bf16']['final_loss']:.4g} in "
        f"{runs['bf16']['seconds']:.1f} s; float32 {runs['fp32']['final_loss']:.4g} after as many steps in "
        f"{runs['fp32']['seconds']:.1f} s, {runs['fp32_in_bf16_time']['final_loss']:.4g} in the same time")
    return runs


def _default_request(extractor, content, style, raw: dict) -> dict:
    result = stylize(extractor, content, [style], parse_params(raw)[0])
    return {"final_loss": result.final_loss["total"], "steps": result.steps, "seconds": result.seconds}


# --- coarse to fine against one scale ----------------------------------------------------------------------------

# The schedules compared: the default (coarse to fine from 128 px), a coarser start, and one scale only.
SCHEDULES = {"coarse_to_fine": 128, "from_64": 64, "one_scale": None}


def coarse_to_fine(extractor, budgets: tuple[int, ...], size: int, repeats: int,
                   request_steps: int | None = None) -> dict:
    """Float32 loss (median of `repeats`) that each schedule reaches at `size` within time budgets of so many
    iterations at `size`, and with the default iteration budget (or `request_steps`) and no time budget (a
    default request); the schedules take turns."""
    content, style = images(size)
    iteration = _seconds_per_iteration(extractor, content, style, size)
    result = {"size": size, "seconds_per_iteration": iteration, "budgets": {}, "default_request": {}}
    for budget in budgets:
        raw = {"size": size, "steps": 10_000, "early_stop_tol": 0, "max_seconds": budget * iteration}
        losses = _schedules(extractor, content, style, raw, repeats)
        result["budgets"][budget] = {name: statistics.median(run["final_loss"] for run in runs)
                                     for name, runs in losses.items()}
        log(f"within {budget} iterations' time ({budget * iteration:.1f} s) at {size} px: "
            + ", ".join(f"{name} {loss:.4g}" for name, loss in result["budgets"][budget].items()))
    default = {"size": size, **({"steps": request_steps} if request_steps else {})}
    for name, runs in _schedules(extractor, content, style, default, repeats).items():
        result["default_request"][name] = {key: statistics.median(run[key] for run in runs)
                                           for key in ("final_loss", "seconds", "steps")}
        log(f"default request at {size} px, {name}: {result['default_request'][name]}")
    return result


def _schedules(extractor, content, style, raw: dict, repeats: int) -> dict[str, list[dict]]:
    runs = {name: [] for name in SCHEDULES}
    for _ in range(repeats):
        for name, min_scale in SCHEDULES.items():
            runs[name].append(_default_request(extractor, content, style,
                                               {**raw, "min_scale": min_scale or raw["size"]}))
    return runs


def _seconds_per_iteration(extractor, content, style, size: int, steps: int = 6) -> float:
    params, _ = parse_params({"size": size, "steps": steps, "min_scale": size, "early_stop_tol": 0})
    stamps = []
    stylize(extractor, content, [style], params, callback=lambda progress: stamps.append(time.perf_counter()))
    return statistics.median(_gaps(stamps))


# --- through TorchServe --------------------------------------------------------------------------------------------


def through_torchserve(weights: str, extractor, settings: dict, repeats: int) -> dict:
    from torchserve_instance import TorchServeInstance

    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        store = Path(work) / "model_store"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--weights", weights,
                        "--export-path", str(store)], check=True, capture_output=True)
        with TorchServeInstance(store, Path(work) / "server") as server:
            log("TorchServe started")
            return {"server_overhead": server_overhead(server, extractor, settings, repeats),
                    "batching": batching_throughput(server, settings, repeats)}


def server_overhead(server, extractor, settings: dict, repeats: int, size: int = 128) -> dict:
    """One request end to end through TorchServe against the same work (decode, stylise, encode) in this
    process, taking turns; and TorchServe's own share directly: end-to-end time minus the worker's engine time
    (X-Style-Seconds), which no cross-process noise blurs."""
    raw = {"size": size, "max_seconds": 240,  # the server's default budget, given to both sides
           **({"steps": settings["server_steps"]} if settings["server_steps"] else {})}
    files = {"content": CONTENT.read_bytes(), "style": STYLE.read_bytes()}
    params, _ = parse_params(raw)
    served, engine, local = [], [], []
    for round_ in range(repeats + 1):  # round 0 warms both sides up and is not counted
        start = time.perf_counter()
        response = _post(server, files, raw)
        served.append(time.perf_counter() - start)
        engine.append(float(response.headers["X-Style-Seconds"]))
        start = time.perf_counter()
        content, style = (decode_image(files[part], part, max_pixels=40_000_000) for part in ("content", "style"))
        encode_image(stylize(extractor, content, [style], params).image)
        local.append(time.perf_counter() - start)
    served, engine, local = served[1:], engine[1:], local[1:]
    result = {"size": size, "params": raw, "steps": int(response.headers["X-Style-Steps"]),
              "server_seconds": statistics.median(served), "worker_engine_seconds": statistics.median(engine),
              "in_process_seconds": statistics.median(local),
              "torchserve_share_seconds": statistics.median(s - e for s, e in zip(served, engine))}
    # The ratio to the engine's own time in the worker, on the same requests: what TorchServe adds (HTTP, queue,
    # batching delay, decoding, encoding). The ratio to the separate in-process runs also carries the machine's
    # run-to-run noise, which here is larger than TorchServe's share.
    result["ratio"] = statistics.median(s / e for s, e in zip(served, engine))
    result["ratio_to_in_process"] = result["server_seconds"] / result["in_process_seconds"]
    log(f"TorchServe at {size} px: {result['server_seconds']:.2f} s end to end, "
        f"{result['worker_engine_seconds']:.2f} s in the worker's engine ({result['ratio']:.3f}); "
        f"the same in-process {result['in_process_seconds']:.2f} s "
        f"({result['ratio_to_in_process']:.3f})")
    return result


def batching_throughput(server, settings: dict, repeats: int, size: int = 64) -> dict:
    """Images per second for 1, 2, 4, 8 identical requests sent at once (TorchServe batches them)."""
    raw = {"size": size, "steps": 20, "early_stop_tol": 0}
    files = {"content": CONTENT.read_bytes(), "style": STYLE.read_bytes()}
    result = {"size": size, "params": raw}
    for clients in (1, 2, 4, 8):
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                responses = list(pool.map(lambda _: _post(server, files, raw), range(clients)))
            assert all(r.status_code == 200 for r in responses)
            rates.append(clients / (time.perf_counter() - start))
        result[clients] = statistics.median(rates)
        log(f"{clients} concurrent {size} px requests: {result[clients]:.2f} images/s")
    return result


def _post(server, files, params):
    import requests

    response = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                             files=files, data={"params": json.dumps(params)}, timeout=600)
    response.raise_for_status()
    return response


# --- memory --------------------------------------------------------------------------------------------------------


def peak_memory(weights_file: Path, sizes: tuple[int, ...]) -> dict:
    """Peak memory a request (a few iterations per scale) adds to a fresh process, measured and as
    style_engine/memory.py estimates it, plain and with checkpointing, in MiB."""
    result = {}
    for size in sizes:
        for checkpoint in (False, True):
            raw = {"size": size, "steps": 4, "early_stop_tol": 0}
            peak = json.loads(_probe("memory", weights_file, CONTENT, STYLE, json.dumps(raw),
                                     *(["--checkpoint"] if checkpoint else [])))
            mib = {key: value / 2**20 for key, value in peak.items()}
            result[f"{size}{' checkpointed' if checkpoint else ''}"] = mib
            log(f"peak memory at {size} px{' checkpointed' if checkpoint else ''}: {mib['measured']:.0f} MiB "
                f"measured, {mib['estimated']:.0f} MiB estimated ({mib['estimated'] / mib['measured']:.2f})")
    return result


def memory_saving(extractor, size: int, repeats: int, steps: int = 6) -> dict:
    """What checkpointing costs in time: median seconds per iteration at `size`, plain and checkpointed,
    taking turns."""
    content, style = images(size)
    params, _ = parse_params({"size": size, "steps": steps, "min_scale": size, "early_stop_tol": 0})
    times = {False: [], True: []}
    for _ in range(repeats):
        for checkpoint, runs in times.items():
            stamps = []
            stylize(extractor, content, [style], params, checkpoint=checkpoint,
                    callback=lambda progress: stamps.append(time.perf_counter()))
            runs += _gaps(stamps)
    result = {"size": size, "plain": statistics.median(times[False]), "checkpointed": statistics.median(times[True])}
    result["time_ratio"] = result["checkpointed"] / result["plain"]
    log(f"per iteration at {size} px: plain {result['plain']:.3f} s, checkpointed {result['checkpointed']:.3f} s "
        f"({result['time_ratio']:.2f}x)")
    return result


def large_request(extractor, size: int, request_steps: int | None) -> dict:
    """A default request at a large size, as a server runs it (its default time budget included): the coarse
    scales do most of the iterations, the output scale refines."""
    from style_engine.params import StyleParams

    content, style = images(size)
    raw = {"size": size, "max_seconds": _server_default("max_seconds"),
           **({"steps": request_steps} if request_steps else {})}
    per_scale = {}  # iterations done by the end of each scale
    result = stylize(extractor, content, [style], parse_params(raw)[0], callback=lambda progress: per_scale.update(
        {f"{progress.size[1]}x{progress.size[0]}": progress.step}))
    report = {"size": size, "seconds": result.seconds, "steps": result.steps, "stop_reason": result.stop_reason,
              "initial_loss": result.initial_loss["total"], "final_loss": result.final_loss["total"],
              "steps_by_scale": per_scale, "precision": result.precision, "default_steps": StyleParams().steps}
    log(f"default request at {size} px: {result.seconds:.1f} s, {result.steps} iterations ({per_scale}), "
        f"{result.stop_reason}, loss {report['initial_loss']:.4g} -> {report['final_loss']:.4g}")
    return report


def _server_default(name: str):
    """A request default of the archive's model-config.yaml (what a server applies)."""
    import yaml

    return yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]["defaults"][name]


def _probe(*arguments) -> str:
    command = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), *map(str, arguments)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


# --- output ----------------------------------------------------------------------------------------------------


def summary(report: dict) -> dict:
    per_iteration = report["per_iteration"]
    largest = max(per_iteration)
    result = {"speedup_to_seed_loss": report["time_to_seed_loss"]["auto"]["speedup"],
              "per_iteration_ratio": per_iteration[largest]["ratio"], "per_iteration_size": largest}
    if "server_overhead" in report:
        result["server_overhead_ratio"] = report["server_overhead"]["ratio"]
        batching = report["batching"]
        result["batching_speedup_8"] = batching[8] / batching[1]
    return result


def write(report: dict, directory: Path, mode: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report["time_to_seed_loss"], directory / f"loss_vs_time-{mode}.png")
    log(f"wrote {directory / f'{mode}.json'} and the plot beside it")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    curves = (("seed: Adam lr 0.003, whole VGG19", result["seed_curve"]),
              ("ours, defaults (bf16 where native)", result["auto"]["curve"]),
              ("ours, float32", result["fp32"]["curve"]))
    for label, curve in curves:
        axes.plot([t for t, _ in curve], [loss for _, loss in curve], label=label)
    axes.axhline(result["seed_loss"], color="grey", linestyle=":",
                 label=f"seed's loss after {result['seed_steps']} steps")
    axes.set(xscale="log", yscale="log", xlabel="wall time, s", ylabel="total loss (the seed's objective)",
             title=f"Reaching the seed's result at {result['size']} px")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
