"""Measurements that need a fresh process: benchmarks/run.py and tests/test_memory.py call them.

    python benchmarks/probe.py memory WEIGHTS CONTENT STYLE PARAMS_JSON... [--checkpoint] [--masks N]   -> JSON
    python benchmarks/probe.py pass WEIGHTS CONTENT STYLE PARAMS_JSON...                                  -> JSON

memory: what one request adds to the process at its peak, measured, beside memory.py's estimate of it
("estimated"). "measured" is the allocator's peak: on a GPU, peak allocated memory less what was allocated
before; on the CPU, glibc's bytes in use (mallinfo2), sampled every half millisecond, less those before.
"resident", on the CPU only, is the kernel's high-water mark of the resident set, reset just before the request
(after glibc has handed freed memory back), less the resident set then: it also counts memory glibc keeps
after a tensor is freed, to reuse it. A few iterations per scale suffice: memory per iteration does not grow
with their number. Localized passes are measured where PARAMS_JSON asks them ("passes": "localized", "tile": N).
--masks N makes it N styles (STYLE each time), each in its own vertical strip of the image.
pass: the same measurement of one iteration's pass (the loss and its gradient with respect to the image) at
the output size, alone: with "passes": "localized" and its "tile", by tiles (localized.py), else over the whole
image; the objective and the image exist before it and are not counted, the image's gradient is; measured
after a first pass, whose first-use allocations a worker pays once.
Several PARAMS_JSON are measured one after the other in the same process, one JSON line each: the first pays
for what a process allocates on its first request, the others do not (a worker's case).
"""

import argparse
import contextlib
import ctypes
import functools
import json
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from style_engine import StyleJob, VGGFeatures, load_features_state_dict, parse_params, stylize_batch  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402
from style_engine.localized import LocalizedPass  # noqa: E402
from style_engine.targets import build_objective, output_size, shrink_to_need  # noqa: E402
from style_engine.memory import Passes, peak_bytes, workload  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory(weights: str, content: str, style: str, raw_params: list[str], checkpoint: bool, masks: int):
    """memory.py's estimate and the measured peak of each of the requests `raw_params`, in turn."""
    extractor = VGGFeatures(load_features_state_dict(weights)).to(DEVICE)
    content_image, style_image = load_image_file(content), load_image_file(style)
    for raw in raw_params:
        yield _memory(extractor, content_image, style_image, raw, checkpoint, masks)


def _memory(extractor, content_image, style_image, raw_params: str, checkpoint: bool, masks: int) -> dict:
    job = StyleJob(content_image, (style_image,) * max(1, masks), parse_params(json.loads(raw_params))[0],
                   _strips(masks, *content_image.shape[-2:]))
    # localized passes as the request asks them ("passes": "localized" with its "tile")
    passes = Passes(checkpoint, job.params.tile if job.params.passes == "localized" else None)
    estimated = peak_bytes(workload([job], DEVICE, passes))
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        stylize_batch(extractor, [job], checkpoint=checkpoint, tile=passes.tile)
        return {"estimated": estimated, "measured": torch.cuda.max_memory_allocated(DEVICE) - before}
    LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    resident_before, in_use_before = _status_bytes("VmRSS"), _in_use()
    with _sampling(_in_use) as peak_in_use:
        stylize_batch(extractor, [job], checkpoint=checkpoint, tile=passes.tile)
    return {"estimated": estimated, "measured": peak_in_use() - in_use_before,
            "resident": _status_bytes("VmHWM") - resident_before}


def one_pass(weights: str, content: str, style: str, raw_params: list[str]):
    """The measured peak of one iteration's pass of each of the requests `raw_params`, in turn."""
    extractor = VGGFeatures(load_features_state_dict(weights)).to(DEVICE)
    content_image, style_image = load_image_file(content), load_image_file(style)
    for raw in raw_params:
        params = parse_params(json.loads(raw))[0]
        job = shrink_to_need(StyleJob(content_image, (style_image,), params))
        size, tile = output_size(job), params.tile if params.passes == "localized" else None
        objective = build_objective(extractor, [job], size, size, bf16=False, tile=tile)
        x = job.content.unsqueeze(0).to(DEVICE).requires_grad_(True)
        run_pass = functools.partial(extractor, pooling=params.pooling)
        if tile is None:
            work = lambda: objective(run_pass(x, objective.layers), x).total.sum().backward()  # noqa: E731
        else:
            work = functools.partial(LocalizedPass(objective, run_pass, tile).evaluate, x, grad=True)
        work()  # the first pass allocates what later ones reuse (a localized one also takes its content target)
        x.grad = None
        yield _peak(work)


def _peak(work) -> dict:
    """What work() adds at its peak, as _memory measures it."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        work()
        return {"measured": torch.cuda.max_memory_allocated(DEVICE) - before}
    LIBC.malloc_trim(0)
    in_use_before = _in_use()
    with _sampling(_in_use) as peak_in_use:
        work()
    return {"measured": peak_in_use() - in_use_before}


def _strips(count: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """`count` masks, each white in its own vertical strip."""
    columns = torch.arange(width) * count // width
    return tuple((columns == k).float().expand(1, height, width).clone() for k in range(count))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = _MallInfo2


def _in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back, in every arena and in mmapped chunks."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


@contextlib.contextmanager
def _sampling(read):
    """The largest value of read() seen while the block runs, sampled every half millisecond."""
    peak, done = [read()], threading.Event()

    def sample():
        while not done.wait(0.0005):
            peak[0] = max(peak[0], read())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join()


def _status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["memory", "pass"])
    parser.add_argument("weights")
    parser.add_argument("content")
    parser.add_argument("style")
    parser.add_argument("params", nargs="+", help="request parameters as a JSON object (several: in turn)")
    parser.add_argument("--checkpoint", action="store_true", help="recompute VGG19's blocks in the backward pass")
    parser.add_argument("--masks", type=int, default=0, help="this many styles, each with a mask of its own")
    args = parser.parse_args()
    rows = (memory(args.weights, args.content, args.style, args.params, args.checkpoint, args.masks)
            if args.command == "memory" else one_pass(args.weights, args.content, args.style, args.params))
    for row in rows:
        print(json.dumps(row), flush=True)
