"""The frozen VGG19 feature extractor and the three ways to get its weights."""

import functools
import hashlib
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CONV_CHANNELS, LAYER_INDEX, LAYER_NAMES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """The requested VGG19 weights cannot be had or are not VGG19 weights."""


def load_features_state_dict(weights: str, deepest_layer: str = "relu5_1") -> dict[str, torch.Tensor]:
    """VGG19 `features` weights up to `deepest_layer`, keyed "0.weight", "0.bias", ... as in `vgg19().features`.

    `weights` is "imagenet" (torch hub cache, else a download), "random" (vgg19(weights=None) built right
    after torch.manual_seed(0)) or the path of a saved state dict (whole `vgg19` or `features` only).
    """
    if weights == "imagenet":
        state = _imagenet_state_dict()
    elif weights == "random":
        state = _random_features()
    elif os.path.isfile(weights):
        state = _file_state_dict(weights)
    else:
        raise WeightsError(f"weights must be 'imagenet', 'random' or the path of a VGG19 state dict; "
                           f"no file at {weights!r}")
    return _checked_features(state, deepest_layer, source=weights)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG19_Weights

    try:  # torchvision caches it under $TORCH_HOME/hub/checkpoints and loads it with weights_only=True
        return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except OSError as error:  # URLError and socket errors are OSErrors
        url = VGG19_Weights.IMAGENET1K_V1.url
        raise WeightsError(
            f"could not download the VGG19 ImageNet weights ({error}). Download {url} where there is network "
            f"and pass its path (--weights PATH or WEIGHTS=PATH), or put it in {torch.hub.get_dir()}/checkpoints/"
        ) from error


@functools.cache
def _random_features() -> dict[str, torch.Tensor]:
    """The `features` of vgg19(weights=None) built right after torch.manual_seed(0). Built once per process: they
    are the same every time, and building VGG19 (its classifier too, which the random numbers run through) takes
    seconds. Callers share the tensors and, as everywhere here, write into none of them."""
    from torchvision.models import vgg19

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        return vgg19(weights=None).features.state_dict()


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-type errors all mean "not a state dict we accept"
        raise WeightsError(f"{path} is not a PyTorch state dict loadable with weights_only=True: {error}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a VGG19 state dict")
    return state


def _checked_features(state: dict, deepest_layer: str, source: str) -> dict[str, torch.Tensor]:
    """The `features.*` entries (or bare entries of a features-only dict) up to `deepest_layer`, shape-checked."""
    prefix = "features." if any(key.startswith("features.") for key in state) else ""
    kept = {}
    for index, (in_channels, out_channels) in CONV_CHANNELS.items():
        if index > LAYER_INDEX[deepest_layer]:
            break
        for name, shape in (("weight", (out_channels, in_channels, 3, 3)), ("bias", (out_channels,))):
            tensor = state.get(f"{prefix}{index}.{name}")
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                found = "missing" if tensor is None else f"shape {tuple(getattr(tensor, 'shape', ()))}"
                raise WeightsError(f"{source} is not a VGG19 state dict: {prefix}{index}.{name} "
                                   f"({LAYER_NAMES[index]}) should have shape {shape}, {found}")
            kept[f"{index}.{name}"] = tensor.detach().float().contiguous()
    return kept


def _blocks(last: int) -> list[tuple[int, int]]:
    """Module index ranges (first, last) of the blocks up to module `last`: each ends with its pooling."""
    ends = [index for index, name in enumerate(LAYER_NAMES[:last]) if name.startswith("pool")] + [last]
    return [(start, end) for start, end in zip([0] + [end + 1 for end in ends[:-1]], ends)]


class VGGFeatures(nn.Module):
    """torchvision's VGG19 `features` up to `deepest_layer`, frozen, with ImageNet normalisation inside.

    Call it with images in [0, 1] and the names of the layers wanted; it runs no layer past the deepest of
    them and returns {name: activation}. The ReLUs are not in-place, so `convX_Y` is the real conv output.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], deepest_layer: str = "relu5_1"):
        super().__init__()
        self.deepest_layer = deepest_layer
        layers = []
        for index, name in enumerate(LAYER_NAMES[: LAYER_INDEX[deepest_layer] + 1]):
            if name.startswith("conv"):
                layers.append(nn.Conv2d(*CONV_CHANNELS[index], kernel_size=3, padding=1))
            elif name.startswith("relu"):
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.layers = nn.Sequential(*layers)  # same indices as vgg19().features, so state dicts load as is
        self.layers.load_state_dict(state_dict)
        # NHWC, which oneDNN and cuDNN's tensor cores run convolutions fastest in: on 2 CPU cores a step at
        # 128-256 px cost 4-17 % less than in NCHW (2026-11-28, in both float32 and bf16)
        self.layers.to(memory_format=torch.channels_last)
        # Identifies the weights, for caches of anything computed through them (targets.GramCache).
        self.fingerprint = hashlib.blake2b(b"".join(t.numpy().tobytes() for t in state_dict.values()),
                                           digest_size=16).hexdigest()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, layers: Iterable[str], pooling: str = "max",
                checkpoint: bool = False) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] -> {layer: (B, C, h, w)} for each requested layer.

        checkpoint=True trades compute for memory when gradients flow: each block (up to and including its
        pooling) keeps only its input for the backward pass and runs again there, instead of keeping every
        activation; the results and gradients are the same (memory.py says how much it saves).
        """
        wanted = set(layers)
        last = max(LAYER_INDEX[name] for name in wanted)
        x = self._normalised(images)
        out = {}
        checkpointed = checkpoint and torch.is_grad_enabled()
        for start, end in _blocks(last) if checkpointed else [(0, last)]:
            names = [LAYER_NAMES[i] for i in range(start, end + 1) if LAYER_NAMES[i] in wanted]
            run = functools.partial(self._run, start=start, end=end, names=names, pooling=pooling)
            x, *kept = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if checkpointed else run(x)
            out.update(zip(names, kept))
        return out

    def stream(self, images: torch.Tensor, layers: Iterable[str], pooling: str = "max"):
        """As forward, but yields (layer, activation) for each requested layer as soon as it is computed, in the
        network's order, keeping nothing itself: a caller that is done with an activation lets it go, and may
        stop before the deepest layer (optimize.finer_start). The same values as forward's."""
        wanted = set(layers)
        x = self._normalised(images)
        for index in range(max(LAYER_INDEX[name] for name in wanted) + 1):
            x = self._layer(index, x, pooling)
            if LAYER_NAMES[index] in wanted:
                yield LAYER_NAMES[index], x

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _run(self, x: torch.Tensor, start: int, end: int, names: list[str], pooling: str) -> tuple:
        """Layers start..end on x: (their output, then the outputs of the layers `names`, in order)."""
        kept = {}
        for index in range(start, end + 1):
            x = self._layer(index, x, pooling)
            if LAYER_NAMES[index] in names:
                kept[LAYER_NAMES[index]] = x
        return (x, *(kept[name] for name in names))

    def _layer(self, index: int, x: torch.Tensor, pooling: str) -> torch.Tensor:
        module = self.layers[index]
        if isinstance(module, nn.MaxPool2d) and pooling == "avg":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return module(x)

    def check_layers(self, layers: Iterable[str]) -> str | None:
        """The first layer this extractor cannot produce (deeper than the one it was cut at), or None."""
        return next((name for name in layers if LAYER_INDEX[name] > LAYER_INDEX[self.deepest_layer]), None)
