"""A run's checkpoint: where a segment of a long optimisation stopped, so that another request goes on from there.

A segment is an ordinary request that stops once its time is up while iterations are left (optimize.py,
`suspend`); its answer is then this checkpoint instead of the image, and the next segment sends it back. It
holds what resuming needs: the image where the optimiser stands at the scale where it stopped (float32, not
8-bit: rounding every segment would add up), that scale's index and the iteration at which it ends, the
iterations and seconds done, the initial losses (reported at the end as one run's), and L-BFGS's state as far
as it fits in OPTIMIZER_STATE_BYTES: its last point and gradient and its newest curvature pairs (lbfgs.py).
All HISTORY pairs are 40 images' worth (about 2 GB at 2048 px, over what a request may carry); an optimiser
that restarts with none takes its short first steps again, which at 7 iterations a segment left a run at four
times the objective of the unsegmented one in tests/test_segments.py. So small images keep it all and resume
where they stopped; at sizes where not even the last point fits, the optimiser restarts at each segment. Adam's
moments are not kept, nor the best image of a scale so far (one more image): where the optimiser stands is
what goes on.

The format is read from anyone (a request part a client could forge), so it is plain data, never pickle or
torch.load: MAGIC, a 4-byte little-endian length, a JSON header that names the tensors and their shapes, then
their little-endian float32 values in that order. Every field is checked, and the shapes against the request's
scale (`check_resume`): a bad checkpoint is a 400 naming the field, never a crash.
"""

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from .errors import ParamError
from .lbfgs import HISTORY

FIELD = "checkpoint"  # the request part (or JSON key) that carries it
MAGIC = b"STYLE-CHECKPOINT-1\n"
LOSS_TERMS = ("content", "style", "tv", "total")
HEADER_MAX_BYTES = 4096
OPTIMIZER_STATE_BYTES = 32 * 2**20  # L-BFGS's state kept, at most: all of it up to about 256 px
OPTIMIZER_TENSORS = ("previous_x", "previous_g", "s", "y")  # BatchedLBFGS.state's, all or none


@dataclass(frozen=True)
class Checkpoint:
    image: torch.Tensor  # (3, h, w) float32 in [0, 1]: where the optimiser stands at the scale where it stopped
    scale: int  # 0-based index of that scale among the request's scales
    scales: int
    scale_until: int  # the iteration count at which that scale hands over to the next
    steps: int  # iterations done over all scales
    seconds: float  # optimisation time spent so far
    initial_loss: dict[str, float]  # of the initial image at the output size (the run's first report)
    loss: dict[str, float]  # the best losses at that scale so far
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # BatchedLBFGS.state(), or none

    def encode(self) -> bytes:
        tensors = {"image": self.image, **self.optimizer}
        header = json.dumps({"scale": self.scale, "scales": self.scales, "scale_until": self.scale_until,
                             "steps": self.steps, "seconds": self.seconds, "initial_loss": self.initial_loss,
                             "loss": self.loss,
                             "tensors": [[name, list(tensor.shape)] for name, tensor in tensors.items()]}).encode()
        data = b"".join(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
                        for tensor in tensors.values())
        return MAGIC + struct.pack("<I", len(header)) + header + data


def decode_checkpoint(data: bytes) -> Checkpoint:
    """The checkpoint in `data`, or a ParamError naming `checkpoint` and what is wrong."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise _bad("it is not a checkpoint this server wrote (wrong magic)")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if length > HEADER_MAX_BYTES or start + length > len(data):
        raise _bad(f"its header length {length} is out of bounds")
    try:
        header = json.loads(bytes(data[start:start + length]))
    except (ValueError, UnicodeDecodeError):
        raise _bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad("its header is not a JSON object")
    tensors = _tensors(header, memoryview(data)[start + length:])
    return Checkpoint(image=tensors.pop("image"), scale=_integer(header, "scale", 0),
                      scales=_integer(header, "scales", 1), scale_until=_integer(header, "scale_until", 0),
                      steps=_integer(header, "steps", 0), seconds=_number(header, "seconds"),
                      initial_loss=_losses(header, "initial_loss"), loss=_losses(header, "loss"), optimizer=tensors)


def check_resume(checkpoint: Checkpoint, sizes: list[tuple[int, int]], steps: int) -> None:
    """Refuse (400) a checkpoint that does not belong to a request with these scale `sizes` and `steps`."""
    if checkpoint.scales != len(sizes) or checkpoint.scale >= len(sizes):
        raise _bad(f"it stopped at scale {checkpoint.scale + 1} of {checkpoint.scales}, but this request has "
                   f"{len(sizes)} scales: send it with the parameters and images of the request that made it")
    size = sizes[checkpoint.scale]
    if tuple(checkpoint.image.shape[-2:]) != size:
        raise _bad(f"its image is {checkpoint.image.shape[-1]}x{checkpoint.image.shape[-2]} px, but this "
                   f"request's scale {checkpoint.scale + 1} is {size[1]}x{size[0]} px")
    if not checkpoint.steps < steps or not checkpoint.steps <= checkpoint.scale_until <= steps:
        raise _bad(f"its iteration counts (steps {checkpoint.steps}, scale until {checkpoint.scale_until}) do not "
                   f"fit this request's steps {steps}")


def _tensors(header: dict, data: memoryview) -> dict[str, torch.Tensor]:
    """The tensors the header lists, read from `data`, their shapes checked against each other."""
    listed = header.get("tensors")
    if not isinstance(listed, list) or not all(isinstance(entry, list) and len(entry) == 2 for entry in listed):
        raise _bad("its header field 'tensors' must be a list of [name, shape]")
    shapes = {str(name): shape for name, shape in listed}
    if len(shapes) != len(listed) or set(shapes) not in ({"image"}, {"image", *OPTIMIZER_TENSORS}):
        raise _bad(f"it must hold the tensor image, and either none or all of {', '.join(OPTIMIZER_TENSORS)}")
    image = _shape(shapes, "image", 3)
    if image[0] != 3 or min(image) < 1:
        raise _bad(f"its image must have the shape [3, height, width]; got {image}")
    n = math.prod(image)
    pairs = _shape(shapes, "s", 2)[0] if "s" in shapes else 0
    expected = {"image": image, "previous_x": [n], "previous_g": [n], "s": [pairs, n], "y": [pairs, n]}
    if any(shapes[name] != expected[name] for name in shapes) or pairs > HISTORY:
        raise _bad(f"the shapes of its tensors ({shapes}) do not fit its image of {image}, with at most "
                   f"{HISTORY} curvature pairs")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if 4 * sum(sizes.values()) != len(data):
        raise _bad(f"it holds {len(data)} bytes of tensors, not the {4 * sum(sizes.values())} its header lists")
    tensors, at = {}, 0
    for name, shape in shapes.items():
        raw = bytearray(data[at:at + 4 * sizes[name]])
        values = torch.frombuffer(raw, dtype=torch.float32) if raw else torch.zeros(0)
        if not bool(torch.isfinite(values).all()):
            raise _bad(f"its tensor {name} holds values that are not finite")
        tensors[name], at = values.reshape(shape), at + 4 * sizes[name]
    for name, (lo, hi) in {"image": (0, 1), "previous_x": (0, 1), "s": (-1, 1)}.items():  # images, and steps
        if name in tensors and tensors[name].numel() and (tensors[name].min() < lo or tensors[name].max() > hi):
            raise _bad(f"its tensor {name} has values outside [{lo}, {hi}]")
    return tensors


def _shape(shapes: dict, name: str, dimensions: int) -> list[int]:
    shape = shapes[name]
    if (not isinstance(shape, list) or len(shape) != dimensions
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**16 for d in shape)):
        raise _bad(f"the shape of its tensor {name} must be {dimensions} integers from 0 to 65536; got {shape!r}")
    return shape


def _integer(header: dict, name: str, lowest: int) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest or value > 2**31:
        raise _bad(f"its header field {name!r} must be an integer of at least {lowest}; got {value!r}")
    return value


def _number(header: dict, name: str) -> float:
    value = header.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise _bad(f"its header field {name!r} must be a number of at least 0; got {value!r}")
    return float(value)


def _losses(header: dict, name: str) -> dict[str, float]:
    value = header.get(name)
    if not isinstance(value, dict) or set(value) != set(LOSS_TERMS):
        raise _bad(f"its header field {name!r} must hold the loss terms {', '.join(LOSS_TERMS)}")
    return {term: _number(value, term) for term in LOSS_TERMS}


def _bad(reason: str) -> ParamError:
    return ParamError(FIELD, f"checkpoint is not usable: {reason}")
