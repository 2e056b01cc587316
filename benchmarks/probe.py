"""Measurements that need a fresh process: benchmarks/run.py calls them.

    python benchmarks/probe.py memory WEIGHTS SIZE CONTENT STYLE   -> MiB

memory: what one request adds to the process at its peak. On the CPU, the resident set is sampled every
millisecond during the request (the kernel's high-water mark would also count the model's loading), after
glibc has returned freed memory; on a GPU, peak allocated memory. A few iterations per scale suffice: memory
per iteration does not grow with their number.
"""

import ctypes
import json
import sys
import threading
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from style_engine import VGGFeatures, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory(weights: str, size: str, content: str, style: str) -> float:
    extractor = VGGFeatures(load_features_state_dict(weights)).to(DEVICE)
    images = load_image_file(content), load_image_file(style)
    params, _ = parse_params({"size": int(size), "steps": 9, "early_stop_tol": 0})
    if DEVICE.type == "cuda":
        stylize(extractor, images[0], [images[1]], params)
        return torch.cuda.max_memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    process, peak, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stylize(extractor, images[0], [images[1]], params)
    done.set()
    sampler.join()
    return (peak[0] - before) / 2**20


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    print(json.dumps({"memory": memory}[command](*arguments)))
