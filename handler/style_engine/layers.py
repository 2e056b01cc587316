"""Names of the layers of torchvision's VGG19 `features`, in execution order.

`convX_Y` is a convolution's output, `reluX_Y` the ReLU after it, `poolX` the pooling that ends block X
(docs/method.md). Index i of `LAYER_NAMES` is module i of `torchvision.models.vgg19().features`.
"""

# torchvision's configuration "E" (VGG19): per block, the number of convolutions and their output channels.
BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def _build() -> tuple[tuple[str, ...], dict[int, tuple[int, int]]]:
    names, conv_channels, in_channels = [], {}, 3
    for block, (convs, out_channels) in enumerate(BLOCKS, start=1):
        for conv in range(1, convs + 1):
            conv_channels[len(names)] = (in_channels, out_channels)
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            in_channels = out_channels
        names.append(f"pool{block}")
    return tuple(names), conv_channels


LAYER_NAMES, CONV_CHANNELS = _build()
"""CONV_CHANNELS: module index of each convolution -> (in_channels, out_channels), what a VGG19 state dict holds."""
LAYER_INDEX: dict[str, int] = {name: i for i, name in enumerate(LAYER_NAMES)}


def deepest(layers) -> str:
    """The layer of `layers` that runs last."""
    return max(layers, key=LAYER_INDEX.__getitem__)


def poolings_before(layer: str) -> int:
    """How many times the image has been halved when it reaches `layer`."""
    return sum(name.startswith("pool") for name in LAYER_NAMES[: LAYER_INDEX[layer] + 1])
