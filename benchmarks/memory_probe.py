"""Peak memory of one request, in a fresh process: benchmarks/run.py calls it once per size.

    python benchmarks/memory_probe.py FEATURES_STATE_DICT SIZE CONTENT STYLE   -> prints MiB

On the CPU: the growth of the resident-set high-water mark during the request; on a GPU: peak allocated memory.
A few iterations per scale suffice: memory per iteration does not grow with the iteration count.
"""

import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from style_engine import VGGFeatures, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.codec import load_image_file  # noqa: E402


def main(weights: str, size: str, content: str, style: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = VGGFeatures(load_features_state_dict(weights)).to(device)
    content_image, style_image = load_image_file(content), load_image_file(style)
    params, _ = parse_params({"size": int(size), "steps": 9, "early_stop_tol": 0})
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stylize(extractor, content_image, [style_image], params)
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024)


if __name__ == "__main__":
    main(*sys.argv[1:])
